// Hands the reading of a transport's inbound connections to a waiter that spins for a
// notification (Transport::spin_begin / poll_inbound / spin_end), and back. Every connection has
// a Reader; its own thread reads whenever it holds `mu`, and between reads calls wait(), which
// sleeps on the socket while nobody spins and away from it while a waiter does, so that an
// arriving message wakes no thread: the spinning waiter, which try-locks `mu`, reads it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "net/event_fd.h"

namespace kvt {

class SpinReaders {
 public:
  struct Reader {
    explicit Reader(int fd) : fd(fd) {}
    const int fd;
    net::EventFd kick;                 // wakes its thread out of poll() when a spin starts
    std::atomic<bool> polling{false};  // its thread sleeps in poll() on the socket
    std::atomic<bool> handoff{false};  // a spinning waiter left what is queued to the thread
    std::mutex mu;                     // held by whoever reads: its thread or a waiter
  };

  // A waiter starts spinning: threads sleeping on their sockets are moved off them.
  void begin(const std::vector<Reader*>& readers);
  // A spinner ended. The last one runs `last` (if given), then sends the threads back to their
  // sockets.
  void end(const std::function<void()>& last = {});
  bool spinning() const { return spinners_.load() > 0; }
  // A spinning waiter met something it does not read (a large or partial unit, an error, end
  // of file): the connection's own thread reads what is queued, then hands it back.
  void hand_back(Reader& r);
  // The connection's thread found nothing to read (and cleared `handoff` under `mu`): returns
  // when its socket may be readable and no waiter is reading it, or when `stopping` is set.
  // Throws TransportError if poll() fails.
  void wait(Reader& r, const std::atomic<bool>& stopping);
  // After `stopping` was set: wakes every thread parked in wait().
  void stop();

 private:
  void wake_parked();

  std::atomic<int> spinners_{0};
  std::mutex park_mu_;
  std::condition_variable park_cv_;
};

}  // namespace kvt
