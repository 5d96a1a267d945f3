// Notifications that arrived at this endpoint, and failures of transfers that will never
// notify: wait_for(payload) returns the first or raises for the second, so half-written memory
// is never taken for a complete transfer.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "net/event_fd.h"

namespace kvt {

struct Notification {
  std::string peer;     // the initiating endpoint's name
  std::string payload;
  bool failed = false;  // a failure event: the transfer that carried this payload failed
  std::string error;
  ErrorCode code = ErrorCode::kTransport;  // of a failure: Protocol for corrupted data
};

// What a waiting thread does instead of sleeping idle on the queue: the Endpoint's inbound
// reading (Transport::reader_begin), so that the message it waits for wakes no other thread
// first (on a VM every wake-up of an idle vCPU costs tens of microseconds).
class WaitActivity {
 public:
  virtual ~WaitActivity() = default;
  // Handles what is queued without blocking; true if it handled any (it may push events).
  virtual bool progress() = 0;
  // Blocks until inbound data may be queued, `wake_fd` is readable or `timeout_ms` passes.
  // False: this thread should step aside and sleep on the queue instead (bulk traffic is better
  // read by the transport's own threads).
  virtual bool sleep(int wake_fd, int timeout_ms) = 0;
  // The waiter stopped reading: found, failed, timed out or stepped aside. Called once, without
  // the queue's lock.
  virtual void over() = 0;
};

class NotificationQueue {
 public:
  using Clock = std::chrono::steady_clock;

  void push(Notification n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      items_.push_back(std::move(n));
      pushes_.fetch_add(1);
    }
    if (sleeper_.load()) wake_.signal();  // it reads sleeper_ after its last look at pushes_
    cv_.notify_all();
  }

  // Removes and returns the first event whose payload matches; throws Transport for a failure
  // event, Timeout when none comes in time. With a `reader`, the waiter reads inbound data
  // itself while it waits: with spin_s > 0 it polls for up to that long (a core's worth of CPU,
  // but the waker need not wake anybody), then sleeps on the queue; with spin_s == 0 it sleeps
  // in the transport instead (one wake-up, its own, rather than a transport thread's and then
  // its own), unless another waiter already does.
  Notification wait_for(const std::string& payload, double timeout_s, double spin_s = 0.0,
                        WaitActivity* reader = nullptr) {
    Notification found;
    auto take = [&] {
      for (auto it = items_.begin(); it != items_.end(); ++it) {
        if (it->payload != payload) continue;
        found = std::move(*it);
        items_.erase(it);
        return true;
      }
      return false;
    };
    if (!wait_until(take, deadline_in(timeout_s), spin_s, reader)) {
      fail(ErrorCode::kTimeout, "no notification '" + printable(payload) + "' within " +
                                    std::to_string(timeout_s) + " s");
    }
    if (found.failed) {
      fail(found.code == ErrorCode::kProtocol ? ErrorCode::kProtocol : ErrorCode::kTransport,
           "the transfer notifying '" + printable(payload) + "' from peer '" + found.peer +
               "' failed: " + found.error + "; its destination memory may be partly written");
    }
    return found;
  }

  // Blocks until at least one event is queued or `timeout_s` passes, then takes them all. A
  // `reader` reads inbound data meanwhile, sleeping in the transport (as wait_for, spin_s 0).
  std::vector<Notification> wait_any(double timeout_s, WaitActivity* reader = nullptr) {
    std::vector<Notification> out;
    auto take = [&] {
      if (items_.empty()) return false;
      out.assign(std::make_move_iterator(items_.begin()), std::make_move_iterator(items_.end()));
      items_.clear();
      return true;
    };
    wait_until(take, deadline_in(timeout_s), 0.0, reader);
    return out;
  }

  std::vector<Notification> drain() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Notification> out(std::make_move_iterator(items_.begin()),
                                  std::make_move_iterator(items_.end()));
    items_.clear();
    return out;
  }

  static std::string printable(const std::string& s) {
    std::string out;
    for (char c : s.substr(0, 64)) out += (c >= 32 && c < 127) ? c : '?';
    return s.size() > 64 ? out + "..." : out;
  }

 private:
  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  static Clock::time_point deadline_in(double seconds) {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(std::max(0.0, seconds)));
  }

  // Waits until `take` (called with the lock held) returns true: false at `deadline`. A
  // `reader` reads meanwhile (see wait_for); when it stops, the queue is looked at once more,
  // since the transport's own threads may have pushed, and then slept on.
  template <class Take>
  bool wait_until(Take& take, Clock::time_point deadline, double spin_s, WaitActivity* reader) {
    struct Reading {  // before the lock: over() runs after it is released
      NotificationQueue& q;
      WaitActivity* reader;
      bool sleeps;
      void end() {
        if (!reader) return;
        if (sleeps) q.sleeper_.store(false);
        reader->over();
        reader = nullptr;
      }
      ~Reading() { end(); }
    } reading{*this, reader, reader && spin_s <= 0};
    if (reading.sleeps && sleeper_.exchange(true)) reading.reader = nullptr;  // one sleeps here
    const auto reading_until =
        reading.sleeps ? deadline : std::min(deadline, deadline_in(std::max(0.0, spin_s)));
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      if (take()) return true;
      if (reading.reader) {
        const uint64_t seen = pushes_.load();
        lock.unlock();
        bool go_on = reading.sleeps ? sleep_reading(seen, reading_until, *reading.reader)
                                    : spin_reading(seen, reading_until, *reading.reader);
        if (!go_on) reading.end();
        lock.lock();
        continue;
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return take();
    }
  }

  // Polls until an event is pushed (true) or `until` passes (false).
  bool spin_reading(uint64_t seen, Clock::time_point until, WaitActivity& reader) {
    while (pushes_.load() == seen) {
      if (Clock::now() >= until) return false;
      if (!reader.progress()) cpu_relax();
    }
    return true;
  }

  // Reads, and sleeps in the transport between reads, until an event is pushed (true), `until`
  // passes or the reader steps aside (false). A push between the last look at pushes_ and the
  // sleep has signalled wake_, which the sleep watches.
  bool sleep_reading(uint64_t seen, Clock::time_point until, WaitActivity& reader) {
    while (pushes_.load() == seen) {
      if (reader.progress()) continue;
      wake_.clear();
      if (pushes_.load() != seen) return true;
      const auto left = until - Clock::now();
      if (left <= Clock::duration::zero()) return false;
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
      if (!reader.sleep(wake_.fd(), static_cast<int>(std::min<int64_t>(ms, 3'600'000)))) {
        return false;
      }
    }
    return true;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Notification> items_;
  std::atomic<uint64_t> pushes_{0};  // lets a reading waiter see a push without the lock
  std::atomic<bool> sleeper_{false};  // a waiter sleeps in the transport: pushes signal wake_
  net::EventFd wake_;
};

}  // namespace kvt
