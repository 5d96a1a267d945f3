// Hands the reading of a transport's inbound connections to a thread that waits for a
// notification (Transport::reader_begin / poll_inbound / sleep_inbound / reader_end), and back.
// Every connection has a Reader; its own thread reads whenever it holds `mu`, and between reads
// calls wait(), which sleeps on the socket while no waiter reads and away from it while one
// does, so that an arriving message wakes no connection thread: the waiter, which try-locks
// `mu`, reads it, spinning or asleep on the sockets itself (sleep()).
#pragma once

#include <poll.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "net/event_fd.h"

namespace kvt {

class WaiterReaders {
 public:
  struct Reader {
    explicit Reader(int fd) : fd(fd) {}
    const int fd;
    net::EventFd kick;                 // wakes its thread out of poll() when a waiter starts
    std::atomic<bool> polling{false};  // its thread sleeps in poll() on the socket
    std::atomic<bool> handoff{false};  // a reading waiter left what is queued to the thread
    std::mutex mu;                     // held by whoever reads: its thread or a waiter
  };

  // A waiter starts reading (`sleeps`: between polls it sleeps in sleep()): threads sleeping on
  // their sockets are moved off them.
  void begin(const std::vector<Reader*>& readers, bool sleeps);
  // A reading waiter ended; the last one sends the threads back to their sockets.
  void end(bool sleeps);
  // The transport serves a new connection: a sleeping waiter wakes to watch its socket too.
  void joined();
  // A sleeping waiter blocks in poll() on `fds` (the sockets it may read), on `wake_fd` and on
  // joined(), for up to `timeout_ms`. Throws TransportError if poll() fails.
  void sleep(std::vector<struct pollfd>& fds, int wake_fd, int timeout_ms);
  // A reading waiter met something it does not read (a large or partial unit, an error, end
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

  std::atomic<int> readers_{0};
  std::atomic<int> sleepers_{0};
  net::EventFd joined_;
  std::mutex park_mu_;
  std::condition_variable park_cv_;
};

}  // namespace kvt
