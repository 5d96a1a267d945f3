#include "transport/waiter_readers.h"

#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"

namespace kvt {
namespace {

// How long a connection stays hot after its last frame: past the gaps between requests of a
// serving loop, so that a decode host's busy peers stay with its waiters between requests.
constexpr int64_t kHotNs = 1'000'000'000;

[[noreturn]] void epoll_failed(const char* what) {
  fail(ErrorCode::kTransport, std::string(what) + " on an inbound connection failed: " +
                                  std::strerror(errno));
}

}  // namespace

WaiterReaders::WaiterReaders() : readable_epoll_(::epoll_create1(EPOLL_CLOEXEC)) {
  if (readable_epoll_ < 0) unwatched_.store(1);  // readable() then says every socket, as before
}

WaiterReaders::~WaiterReaders() {
  if (readable_epoll_ >= 0) ::close(readable_epoll_);
}

void WaiterReaders::readable(Readable& out, size_t conns) {
  out.n_ = 0;
  out.all_ = conns <= kDirectLooks || unwatched_.load() > 0;
  if (out.all_) return;
  struct epoll_event evs[Readable::kMax];
  const int n = ::epoll_wait(readable_epoll_, evs, Readable::kMax, 0);
  if (n < 0 || n == Readable::kMax) {  // interrupted, or more than it holds: try them all
    out.all_ = true;
    return;
  }
  for (int i = 0; i < n; ++i) out.fds_[i] = evs[i].data.fd;
  out.n_ = n;
}

WaiterReaders::Reader::Reader(int fd) : fd(fd), epoll_fd_(::epoll_create1(EPOLL_CLOEXEC)) {
  if (epoll_fd_ < 0) epoll_failed("epoll_create1");
  struct epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = kick_.fd();
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, kick_.fd(), &ev) != 0) {
    const int err = errno;
    ::close(epoll_fd_);
    errno = err;
    epoll_failed("epoll_ctl");
  }
}

WaiterReaders::Reader::~Reader() { ::close(epoll_fd_); }

// The coarse clock (a few ms of resolution) is enough for kHotNs and costs no system call.
int64_t WaiterReaders::coarse_now_ns() {
  struct timespec t;
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
  return int64_t{t.tv_sec} * 1'000'000'000 + t.tv_nsec;
}

void WaiterReaders::took(Reader& r) {
  const int64_t until = coarse_now_ns() + kHotNs;
  // Written once per clock tick at most: a waiter's latency path reads it back in no time.
  if (r.hot_until_ns_.load(std::memory_order_relaxed) != until) {
    r.hot_until_ns_.store(until, std::memory_order_relaxed);
  }
}

bool WaiterReaders::arm(Reader& r) {
  const bool hot = coarse_now_ns() < r.hot_until_ns_.load(std::memory_order_relaxed);
  // A sleeping waiter takes them all: it sleeps on the sockets it took, and one that a thread
  // reads (bulk traffic on a connection that was quiet) would wake it for nothing, again and
  // again, without a hand-back that would tell it to step aside.
  const bool want = readers_ == 0 || r.handoff.load() || !(hot || sleepers_ > 0);
  if (want == r.armed_) return true;
  struct epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = r.fd;
  // Adding a socket that holds data makes it ready at once: its thread wakes for it.
  if (::epoll_ctl(r.epoll_fd_, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, r.fd, &ev) != 0) return false;
  r.armed_ = want;
  return true;
}

// A socket that could not be moved is its thread's to report: kicked, it tries again in wait().
void WaiterReaders::arm_all() {
  for (Reader* r : joined_readers_) {
    if (!arm(*r)) r->kick_.signal();
  }
}

void WaiterReaders::begin(bool sleeps) {
  std::lock_guard<std::mutex> lock(mu_);
  const bool first_sleeper = sleeps && sleepers_++ == 0;
  if (readers_++ == 0 || first_sleeper) arm_all();
}

void WaiterReaders::end(bool sleeps) {
  std::lock_guard<std::mutex> lock(mu_);
  const bool last_sleeper = sleeps && --sleepers_ == 0;
  if (--readers_ == 0 || last_sleeper) arm_all();
}

// The caller marked the connection served first; a sleeper counted itself before it listed
// the served ones. So either it listed this one or this sees it and wakes it.
void WaiterReaders::joined(Reader& r) {
  std::lock_guard<std::mutex> lock(mu_);
  joined_readers_.insert(&r);
  struct epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = r.fd;
  r.watched_ = readable_epoll_ >= 0 && ::epoll_ctl(readable_epoll_, EPOLL_CTL_ADD, r.fd, &ev) == 0;
  if (!r.watched_) unwatched_.fetch_add(1);
  if (sleepers_ > 0) joined_.signal();
}

void WaiterReaders::left(Reader& r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (joined_readers_.erase(&r) == 0) return;
  if (r.watched_) {
    ::epoll_ctl(readable_epoll_, EPOLL_CTL_DEL, r.fd, nullptr);
  } else {
    unwatched_.fetch_sub(1);
  }
}

void WaiterReaders::sleep(std::vector<struct pollfd>& fds, int wake_fd, int timeout_ms) {
  fds.push_back({wake_fd, POLLIN, 0});
  fds.push_back({joined_.fd(), POLLIN, 0});
  int rc = ::poll(fds.data(), fds.size(), timeout_ms);
  if (rc < 0 && errno != EINTR) {
    fail(ErrorCode::kTransport, std::string("poll by a waiter on the inbound connections failed: ") +
                                    std::strerror(errno));
  }
  if (fds.back().revents & POLLIN) joined_.clear();
}

// What it hands back may not make the socket readable (a failure met by the waiter): the kick
// wakes the thread whatever the socket holds.
void WaiterReaders::hand_back(Reader& r) {
  r.handoff.store(true);
  r.kick_.signal();
}

void WaiterReaders::stop() {
  std::lock_guard<std::mutex> lock(mu_);
  for (Reader* r : joined_readers_) r->kick_.signal();
}

void WaiterReaders::wait(Reader& r, const std::atomic<bool>& stopping) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping.load()) return;  // stop() kicks only after `stopping` is set: checked here
    if (!arm(r)) epoll_failed("epoll_ctl");
  }
  struct epoll_event evs[2];
  int n = ::epoll_wait(r.epoll_fd_, evs, 2, -1);
  if (n < 0 && errno != EINTR) epoll_failed("epoll_wait");
  for (int i = 0; i < n; ++i) {
    if (evs[i].data.fd == r.kick_.fd()) r.kick_.clear();
  }
}

}  // namespace kvt
