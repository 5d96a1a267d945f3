// Hands the reading of a transport's inbound connections to a thread that waits for a
// notification (Transport::reader_begin / poll_inbound / sleep_inbound / reader_end), and back.
// Every connection has a Reader; its own thread reads whenever it holds `mu`, and between reads
// sleeps in wait(), in epoll on its socket while no waiter reads and on nothing but its kick
// while one does. Its socket is taken out of (and put back into) that epoll set by the waiters
// themselves: epoll_ctl wakes nobody, so a spinning waiter's start and end cost the sleeping
// connection threads nothing, and an arriving message wakes no connection thread either: the
// waiter, which try-locks `mu`, reads it, spinning or asleep on the sockets itself (sleep()).
// While only spinning waiters read, only connections that carried frames lately ("hot",
// took()) are moved so: an epoll_ctl per connection at every waiter's start and end made each
// wait slower the more peers were connected, idle or not. A frame on a connection left with its
// thread wakes that thread once; the connection is hot from then on. A sleeping waiter takes
// every connection, as it sleeps on the sockets it took.
#pragma once

#include <poll.h>

#include <atomic>
#include <mutex>
#include <set>
#include <vector>

#include "net/event_fd.h"

namespace kvt {

class WaiterReaders {
 public:
  WaiterReaders();
  ~WaiterReaders();
  WaiterReaders(const WaiterReaders&) = delete;
  WaiterReaders& operator=(const WaiterReaders&) = delete;

  class Reader {
   public:
    explicit Reader(int fd);  // fd: the connection's socket, which stays its owner's
    ~Reader();
    Reader(const Reader&) = delete;
    Reader& operator=(const Reader&) = delete;

    const int fd;
    std::atomic<bool> handoff{false};  // a reading waiter left what is queued to the thread
    std::mutex mu;                     // held by whoever reads: its thread or a waiter

   private:
    friend class WaiterReaders;
    net::EventFd kick_;  // wakes its thread: a hand-back, or stop()
    int epoll_fd_;       // kick_, and the socket while armed_
    bool armed_ = false;  // under WaiterReaders::mu_
    std::atomic<int64_t> hot_until_ns_{0};  // see took()
    bool watched_ = false;  // under WaiterReaders::mu_: in readable_epoll_
  };

  // The joined sockets that had bytes queued (or an error) when readable() looked, from one
  // epoll_wait. A reading waiter with many connections tries to receive only on those, instead
  // of on every connection in turn: a system call per connection per turn made its every look
  // slower the more peers were connected, though idle (docs/transports.md).
  class Readable {
   public:
    bool has(const Reader& r) const {
      if (all_) return true;
      for (int i = 0; i < n_; ++i) {
        if (fds_[i] == r.fd) return true;
      }
      return false;
    }

   private:
    friend class WaiterReaders;
    static constexpr int kMax = 64;
    int fds_[kMax];
    int n_ = 0;
    bool all_ = false;  // unknown (more than kMax, or a socket epoll could not watch): all
  };
  // Fills `out` for a waiter about to look at `conns` connections. Up to kDirectLooks of them it
  // says "all" without a system call: a receive on each costs less than an epoll_wait and then
  // a receive (measured on the bench's 64 KiB write over two connections).
  void readable(Readable& out, size_t conns);
  static constexpr size_t kDirectLooks = 4;

  // A waiter starts reading (`sleeps`: between polls it sleeps in sleep()): the first one takes
  // every hot connection's socket (took()) out of its thread's epoll set, the first sleeping
  // one every socket.
  void begin(bool sleeps);
  // A reading waiter ended; the last one puts the sockets back (a thread whose socket holds
  // data wakes).
  void end(bool sleeps);
  // The transport serves a new connection, read by `r`'s thread from now on until left(r): a
  // sleeping waiter wakes to watch its socket too.
  void joined(Reader& r);
  // `r`'s thread stops reading (its connection ended); before `r` is destroyed.
  void left(Reader& r);
  // A sleeping waiter blocks in poll() on `fds` (the sockets it may read), on `wake_fd` and on
  // joined(), for up to `timeout_ms`. Throws TransportError if poll() fails.
  void sleep(std::vector<struct pollfd>& fds, int wake_fd, int timeout_ms);
  // Transport::sleep_inbound over a transport's connections (`conns`, under `mu`: a map whose
  // values point to something with `serving` and `io`, its Reader): sleeps on those past their
  // hello; false at once if one was handed back (its thread reads bulk traffic, and the waiter
  // should step aside) or the transport is `stopping`. Over more than kDirectLooks connections
  // it sleeps on the epoll set of them all (readable()) instead: one file to poll, not one
  // per connection.
  template <class Conns>
  bool sleep_on(std::mutex& mu, const std::atomic<bool>& stopping, const Conns& conns,
                int wake_fd, int timeout_ms) {
    std::vector<struct pollfd> fds;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (stopping.load()) return false;
      for (const auto& [_, c] : conns) {
        if (!c->serving.load()) continue;  // see joined()
        if (c->io.handoff.load()) return false;
        fds.push_back({c->io.fd, POLLIN, 0});
      }
    }
    if (fds.size() > kDirectLooks && unwatched_.load() == 0) {
      fds.assign(1, {readable_epoll_, POLLIN, 0});
    }
    sleep(fds, wake_fd, timeout_ms);
    return true;
  }
  // A frame came on `r` (read by a waiter or by r's thread): for kHotNs from now, waiters that
  // read take r's socket from its thread (begin()).
  void took(Reader& r);
  // A reading waiter met something it does not read (a large or partial unit, an error, end
  // of file): the connection's own thread reads what is queued, then hands it back.
  void hand_back(Reader& r);
  // The connection's thread found nothing to read (and cleared `handoff` under `mu`): returns
  // when its socket may be readable and no waiter is reading it, when it was handed back, or
  // when `stopping` is set. Throws TransportError if epoll fails.
  void wait(Reader& r, const std::atomic<bool>& stopping);
  // After `stopping` was set: wakes every thread in wait().
  void stop();

 private:
  // Puts r's socket in its epoll set or takes it out, as its thread should wake for data:
  // when no waiter reads, or when one handed it back. Under mu_; false (errno set) if
  // epoll_ctl failed.
  bool arm(Reader& r);
  void arm_all();
  static int64_t coarse_now_ns();

  std::mutex mu_;  // the counts, joined_readers_ and every Reader's armed_
  int readers_ = 0;
  int sleepers_ = 0;
  std::set<Reader*> joined_readers_;
  net::EventFd joined_;
  int readable_epoll_;            // every joined socket, for readable()
  std::atomic<int> unwatched_{0};  // joined sockets epoll_ctl refused: readable() says all
};

}  // namespace kvt
