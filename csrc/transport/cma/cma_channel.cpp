#include "transport/cma/cma_channel.h"

#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "core/error.h"

namespace kvt::cma {
namespace {

struct Wire {
  uint32_t type;
  uint32_t arg;
  uint64_t slot;
};

constexpr size_t kMaxFds = 2;

socklen_t abstract_addr(const std::string& name, struct sockaddr_un& a) {
  if (name.empty() || name.size() + 1 > sizeof a.sun_path) {
    fail(ErrorCode::kInvalidRequest, "cma: bad socket name '" + name + "'");
  }
  std::memset(&a, 0, sizeof a);
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path + 1, name.data(), name.size());  // sun_path[0] = 0: abstract
  return static_cast<socklen_t>(offsetof(struct sockaddr_un, sun_path) + 1 + name.size());
}

}  // namespace

net::Socket listen_abstract(const std::string& name) {
  net::Socket s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!s.valid()) fail(ErrorCode::kTransport, std::string("cma: socket failed: ") + std::strerror(errno));
  struct sockaddr_un a;
  socklen_t len = abstract_addr(name, a);
  if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(s.fd(), 128) != 0) {
    fail(ErrorCode::kTransport, "cma: cannot listen on abstract socket @" + name + ": " +
                                    std::strerror(errno));
  }
  return s;
}

net::Socket connect_abstract(const std::string& name, double timeout_s) {
  net::Socket s(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!s.valid()) fail(ErrorCode::kTransport, std::string("cma: socket failed: ") + std::strerror(errno));
  struct sockaddr_un a;
  socklen_t len = abstract_addr(name, a);
  set_recv_timeout(s, timeout_s);
  struct timeval tv{static_cast<time_t>(timeout_s),
                    static_cast<suseconds_t>((timeout_s - static_cast<double>(static_cast<time_t>(timeout_s))) * 1e6)};
  ::setsockopt(s.fd(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  while (::connect(s.fd(), reinterpret_cast<sockaddr*>(&a), len) != 0) {
    if (errno == EINTR) continue;
    int e = errno;
    if (e == ECONNREFUSED || e == ENOENT) {
      fail(ErrorCode::kTransport,
           "cma: no target listens on @" + name + " in this network namespace: the target runs "
           "in another network namespace or container, or has exited. cma connects only "
           "processes on one host in one network namespace; use transport='tcp' otherwise");
    }
    fail(ErrorCode::kTransport, "cma: connecting to @" + name + " failed: " + std::strerror(e));
  }
  return s;
}

void set_recv_timeout(const net::Socket& s, double seconds) {
  struct timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  ::setsockopt(s.fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

void send_msg(const net::Socket& s, MsgType type, uint32_t arg, uint64_t slot,
              const std::string& text, const std::vector<int>& fds) {
  Wire w{static_cast<uint32_t>(type), arg, slot};
  std::string body = text.substr(0, kMaxText);
  struct iovec iov[2] = {{&w, sizeof w}, {body.data(), body.size()}};
  struct msghdr m{};
  m.msg_iov = iov;
  m.msg_iovlen = body.empty() ? 1 : 2;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  if (!fds.empty()) {
    std::memset(control, 0, sizeof control);
    m.msg_control = control;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    struct cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  while (::sendmsg(s.fd(), &m, MSG_NOSIGNAL) < 0) {
    if (errno == EINTR) continue;
    fail(ErrorCode::kTransport, std::string("cma session socket: send failed: ") + std::strerror(errno));
  }
}

namespace {

// One record; 0 at end of file, -1 when `flags` has MSG_DONTWAIT and none is queued.
ssize_t recv_record(const net::Socket& s, Msg& out, int flags) {
  Wire w{};
  char text[kMaxText];
  struct iovec iov[2] = {{&w, sizeof w}, {text, sizeof text}};
  struct msghdr m{};
  m.msg_iov = iov;
  m.msg_iovlen = 2;
  alignas(struct cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
  m.msg_control = control;
  m.msg_controllen = sizeof control;
  ssize_t r;
  while ((r = ::recvmsg(s.fd(), &m, MSG_CMSG_CLOEXEC | flags)) < 0) {
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      if (flags & MSG_DONTWAIT) return -1;
      fail(ErrorCode::kTimeout, "cma session socket: the peer did not answer in time");
    }
    fail(ErrorCode::kTransport, std::string("cma session socket: receive failed: ") + std::strerror(errno));
  }
  if (r == 0) return 0;
  out.fds.clear();
  for (struct cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      out.fds.push_back(fd);
    }
  }
  if (static_cast<size_t>(r) < sizeof w || (m.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
    for (int fd : out.fds) ::close(fd);
    out.fds.clear();
    fail(ErrorCode::kProtocol, "cma session socket: malformed record of " + std::to_string(r) + " bytes");
  }
  out.type = static_cast<MsgType>(w.type);
  out.arg = w.arg;
  out.slot = w.slot;
  out.text.assign(text, static_cast<size_t>(r) - sizeof w);
  return r;
}

}  // namespace

bool recv_msg(const net::Socket& s, Msg& out) { return recv_record(s, out, 0) > 0; }

Received recv_msg_now(const net::Socket& s, Msg& out) {
  ssize_t r = recv_record(s, out, MSG_DONTWAIT);
  return r > 0 ? Received::kRecord : r == 0 ? Received::kEnd : Received::kNothing;
}

int peer_pid(const net::Socket& s) {
  struct ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(s.fd(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return 0;
  return cred.pid;
}

}  // namespace kvt::cma
