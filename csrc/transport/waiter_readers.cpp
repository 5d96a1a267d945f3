#include "transport/waiter_readers.h"

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"

namespace kvt {

void WaiterReaders::begin(const std::vector<Reader*>& readers, bool sleeps) {
  if (sleeps) sleepers_.fetch_add(1);
  readers_.fetch_add(1);
  for (Reader* r : readers) {
    if (r->polling.load()) r->kick.signal();
  }
}

void WaiterReaders::end(bool sleeps) {
  if (sleeps) sleepers_.fetch_sub(1);
  if (readers_.fetch_sub(1) == 1) wake_parked();
}

// The caller marked the connection served first; a sleeper counted itself before it listed
// the served ones. So either it listed this one or this sees it and wakes it.
void WaiterReaders::joined() {
  if (sleepers_.load() > 0) joined_.signal();
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

void WaiterReaders::hand_back(Reader& r) {
  r.handoff.store(true);
  wake_parked();
}

void WaiterReaders::stop() { wake_parked(); }

void WaiterReaders::wake_parked() {
  { std::lock_guard<std::mutex> lock(park_mu_); }  // a thread deciding to park sees the change
  park_cv_.notify_all();
}

void WaiterReaders::wait(Reader& r, const std::atomic<bool>& stopping) {
  auto parked = [&] { return readers_.load() > 0 && !r.handoff.load() && !stopping.load(); };
  if (parked()) {
    std::unique_lock<std::mutex> lock(park_mu_);
    park_cv_.wait(lock, [&] { return !parked(); });
    return;
  }
  // Either a waiter starting to read sees `polling` and kicks, or this sees the waiter.
  r.polling.store(true);
  if (parked()) {
    r.polling.store(false);
    return;
  }
  struct pollfd pfds[2] = {{r.fd, POLLIN, 0}, {r.kick.fd(), POLLIN, 0}};
  int rc = ::poll(pfds, 2, -1);
  r.polling.store(false);
  if (rc < 0 && errno != EINTR) {
    fail(ErrorCode::kTransport, std::string("poll on an inbound connection failed: ") +
                                    std::strerror(errno));
  }
  if (pfds[1].revents & POLLIN) r.kick.clear();
}

}  // namespace kvt
