// How the receiving side's system calls shape a 64 KiB one-way transfer over loopback TCP: the
// probe behind the TCP waiter's single receive (benchmarks/NOTES.md, docs/transports.md).
// A sender process sendmsg()s HEADS bytes of frame heads and a 64 KiB payload in one call; the
// receiver, spinning, takes them in one of four ways:
//   bare   recv straight into place (HEADS must be 0)          - what bare sockets do
//   peek   MSG_PEEK the heads, then one recvmsg of heads + payload into place
//   exact  three exact reads of the heads, then the payload into place
//   stage  one recv of everything into a buffer, then a copy of the payload into place
// COLD_BYTES of memset before each rep in both processes stand in for the bench's work between
// reps (it refills the source and poisons the destination), which leaves the caches cold.
// Prints the median one-way time (sender's sendmsg starting -> every byte in place).
//
//   cc -O2 -o /tmp/loopback_receive benchmarks/probes/loopback_receive.c
//   for m in bare peek exact stage; do h=200; [ $m = bare ] && h=0
//     /tmp/loopback_receive $m $h 4194304; done
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { kPayload = 65536, kReps = 400, kWarmup = 30 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

// Receives exactly n bytes into p, spinning on a non-blocking socket.
static void spin_recv(int fd, char* p, size_t n) {
  for (size_t got = 0; got < n;) {
    ssize_t r = recv(fd, p + got, n - got, MSG_DONTWAIT);
    if (r > 0) got += (size_t)r;
  }
}

static void receive(int fd, const char* mode, char* heads, size_t nheads, char* dst, char* stage) {
  ssize_t r;
  size_t got = 0;
  if (strcmp(mode, "bare") == 0) {
    spin_recv(fd, dst, kPayload);
    return;
  }
  if (strcmp(mode, "peek") == 0) {
    while (recv(fd, heads, nheads, MSG_PEEK | MSG_DONTWAIT) <= 0) {
    }
    struct iovec iov[2] = {{heads, nheads}, {dst, kPayload}};
    struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
    while ((r = recvmsg(fd, &mh, MSG_DONTWAIT)) <= 0) {
    }
    got = (size_t)r - nheads;
  } else if (strcmp(mode, "exact") == 0) {
    size_t cuts[3] = {48, nheads - 100, 52};
    for (size_t i = 0, at = 0; i < 3; at += cuts[i], ++i) spin_recv(fd, heads + at, cuts[i]);
  } else {  // stage
    while ((r = recv(fd, stage, nheads + kPayload, MSG_DONTWAIT)) <= 0) {
    }
    got = (size_t)r - nheads;
    memcpy(dst, stage + nheads, got);
  }
  spin_recv(fd, dst + got, kPayload - got);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s bare|peek|exact|stage HEADS COLD_BYTES\n", argv[0]);
    return 2;
  }
  const char* mode = argv[1];
  size_t nheads = (size_t)atol(argv[2]), cold = (size_t)atol(argv[3]);
  if ((strcmp(mode, "bare") == 0) != (nheads == 0) || (strcmp(mode, "exact") == 0 && nheads < 200)) {
    fprintf(stderr, "bare takes HEADS 0, the others at least 1 (exact: 200)\n");
    return 2;
  }
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof a;
  if (bind(ls, (void*)&a, sizeof a) || listen(ls, 1) || getsockname(ls, (void*)&a, &alen)) {
    perror("listen");
    return 1;
  }
  int go[2];
  if (pipe(go)) return 1;
  double* sent = mmap(0, sizeof(double) * kReps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                      -1, 0);
  char* junk = malloc(cold + 1);
  if (fork() == 0) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(s, (void*)&a, sizeof a)) _exit(1);
    char* src = malloc(kPayload);
    char heads[4096];
    memset(heads, 1, sizeof heads);
    for (int rep = 0; rep < kReps; ++rep) {
      memset(src, rep, kPayload);
      memset(junk, rep, cold);
      char c;
      if (read(go[0], &c, 1) != 1) _exit(1);
      struct iovec iov[2] = {{heads, nheads}, {src, kPayload}};
      struct msghdr mh = {.msg_iov = nheads ? iov : iov + 1, .msg_iovlen = nheads ? 2 : 1};
      sent[rep] = now();
      if (sendmsg(s, &mh, 0) != (ssize_t)(nheads + kPayload)) _exit(1);
    }
    _exit(0);
  }
  int c = accept(ls, 0, 0), one = 1;
  setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char* dst = malloc(kPayload);
  char* stage = malloc(nheads + kPayload);
  char heads[4096];
  double one_way[kReps];
  for (int rep = 0; rep < kReps; ++rep) {
    memset(dst, 0xAA, kPayload);
    memset(junk, rep + 1, cold);
    if (write(go[1], "x", 1) != 1) return 1;
    receive(c, mode, heads, nheads, dst, stage);
    one_way[rep] = now() - sent[rep];
    if (dst[0] != (char)rep || dst[kPayload - 1] != (char)rep) {
      fprintf(stderr, "rep %d: wrong bytes\n", rep);
      return 1;
    }
  }
  wait(0);
  qsort(one_way + kWarmup, kReps - kWarmup, sizeof(double), by_value);
  printf("%-5s heads %4zu, cold %7zu B: one way p50 %5.1f us\n", mode, nheads, cold,
         one_way[kWarmup + (kReps - kWarmup) / 2] * 1e6);
  return 0;
}
