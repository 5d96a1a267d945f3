#include "transport/spin_readers.h"

#include <poll.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "core/error.h"

namespace kvt {

void SpinReaders::begin(const std::vector<Reader*>& readers) {
  spinners_.fetch_add(1);
  for (Reader* r : readers) {
    if (r->polling.load()) r->kick.signal();
  }
}

void SpinReaders::end(const std::function<void()>& last) {
  if (spinners_.fetch_sub(1) != 1) return;
  if (last) last();
  wake_parked();
}

void SpinReaders::hand_back(Reader& r) {
  r.handoff.store(true);
  wake_parked();
}

void SpinReaders::stop() { wake_parked(); }

void SpinReaders::wake_parked() {
  { std::lock_guard<std::mutex> lock(park_mu_); }  // a thread deciding to park sees the change
  park_cv_.notify_all();
}

void SpinReaders::wait(Reader& r, const std::atomic<bool>& stopping) {
  auto parked = [&] { return spinners_.load() > 0 && !r.handoff.load() && !stopping.load(); };
  if (parked()) {
    std::unique_lock<std::mutex> lock(park_mu_);
    park_cv_.wait(lock, [&] { return !parked(); });
    return;
  }
  // Either a waiter starting to spin sees `polling` and kicks, or this sees the waiter.
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
