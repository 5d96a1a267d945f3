// Notifications that arrived at this endpoint, and failures of transfers that will never
// notify: wait_for(payload) returns the first or raises for the second, so half-written memory
// is never taken for a complete transfer.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
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
    }
    cv_.notify_all();
  }

  // Removes and returns the first event whose payload matches; throws Transport for a failure
  // event, Timeout when none comes in time.
  Notification wait_for(const std::string& payload, double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(timeout_s));
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
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Notification> items_;
};

}  // namespace kvt
