// Notifications that arrived at this endpoint, and failures of transfers that will never
// notify: wait_for(payload) returns the first or raises for the second, so half-written memory
// is never taken for a complete transfer.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

namespace kvt {

struct Notification {
  std::string peer;     // the initiating endpoint's name
  std::string payload;
  bool failed = false;  // a failure event: the transfer that carried this payload failed
  std::string error;
  ErrorCode code = ErrorCode::kTransport;  // of a failure: Protocol for corrupted data
};

class NotificationQueue {
 public:
  void push(Notification n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      items_.push_back(std::move(n));
      pushes_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

  // Removes and returns the first event whose payload matches; throws Transport for a failure
  // event, Timeout when none comes in time. With spin_s > 0 it first polls for up to that long
  // instead of sleeping: the waker then need not wake a sleeping thread (on a VM, an idle vCPU),
  // which halves small-transfer latency here, for a core's worth of CPU while it polls. While
  // it polls it calls `progress` (without the lock; it may push events from this thread), and
  // `spin_over` once when polling ends: found, failed, timed out, or about to sleep.
  Notification wait_for(const std::string& payload, double timeout_s, double spin_s = 0.0,
                        const std::function<bool()>& progress = {},
                        const std::function<void()>& spin_over = {}) {
    struct SpinPhase {
      const std::function<void()>& over;
      bool on;
      void end() {
        if (on && over) over();
        on = false;
      }
      ~SpinPhase() { end(); }
    } phase{spin_over, spin_s > 0};  // before the lock: ends after it is released
    std::unique_lock<std::mutex> lock(mu_);
    using Duration = std::chrono::steady_clock::duration;
    auto now = std::chrono::steady_clock::now();
    auto deadline = now + std::chrono::duration_cast<Duration>(std::chrono::duration<double>(timeout_s));
    auto spin_end = std::min(deadline, now + std::chrono::duration_cast<Duration>(
                                                 std::chrono::duration<double>(std::max(0.0, spin_s))));
    while (true) {
      for (auto it = items_.begin(); it != items_.end(); ++it) {
        if (it->payload != payload) continue;
        Notification n = std::move(*it);
        items_.erase(it);
        if (n.failed) {
          fail(n.code == ErrorCode::kProtocol ? ErrorCode::kProtocol : ErrorCode::kTransport,
               "the transfer notifying '" + printable(payload) +
                                          "' from peer '" + n.peer + "' failed: " + n.error +
                                          "; its destination memory may be partly written");
        }
        return n;
      }
      if (phase.on) {
        if (std::chrono::steady_clock::now() < spin_end) {
          uint64_t seen = pushes_.load(std::memory_order_acquire);
          lock.unlock();
          while (pushes_.load(std::memory_order_acquire) == seen &&
                 std::chrono::steady_clock::now() < spin_end) {
            if (!(progress && progress())) cpu_relax();
          }
        } else {
          lock.unlock();
          phase.end();  // then look once more: the transport's own threads may have pushed
        }
        lock.lock();
        continue;
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout &&
          std::none_of(items_.begin(), items_.end(),
                       [&](const Notification& n) { return n.payload == payload; })) {
        fail(ErrorCode::kTimeout, "no notification '" + printable(payload) + "' within " +
                                      std::to_string(timeout_s) + " s");
      }
    }
  }

  // Blocks until at least one event is queued or `timeout_s` passes, then takes them all.
  std::vector<Notification> wait_any(double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return !items_.empty(); });
    std::vector<Notification> out(std::make_move_iterator(items_.begin()),
                                  std::make_move_iterator(items_.end()));
    items_.clear();
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

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Notification> items_;
  std::atomic<uint64_t> pushes_{0};  // lets a spinning waiter see a push without the lock
};

}  // namespace kvt
