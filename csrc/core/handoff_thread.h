// A thread that runs work handed off by a latency-critical thread: a waiter that read inbound
// data and found its notification leaves what it still owes (acknowledgements to send, the
// connections to give back to the transport's threads) here and returns at once. Jobs run in
// order; after stop() a job runs on the caller.
#pragma once

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "core/thread_name.h"

namespace kvt {

class HandoffThread {
 public:
  HandoffThread() : thread_([this] { loop(); }) {}
  ~HandoffThread() { stop(); }
  HandoffThread(const HandoffThread&) = delete;
  HandoffThread& operator=(const HandoffThread&) = delete;

  // A spinning waiter is about to hand work off: until its post_quietly(), and for kLinger
  // after, the thread looks for work every kPoll instead of sleeping until woken, so that the
  // waiter can hand off without paying for a wake-up (a cross-core interrupt on a VM: 2-4 µs
  // on the latency path). It is woken here only if it sleeps (the first spin after a pause).
  void watch() {
    std::lock_guard<std::mutex> lock(mu_);
    ++watchers_;
    if (sleeping_) cv_.notify_one();
  }

  // Hands `job` off within kPoll, without a wake-up, and closes one watch().
  void post_quietly(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      --watchers_;
      linger_until_ = std::chrono::steady_clock::now() + kLinger;
      if (!stopped_) {
        jobs_.push_back(std::move(job));  // its own watch() keeps the thread looking
        return;
      }
    }
    job();
  }

  // Hands `job` off, waking the thread if it sleeps (a sleeping waiter never watch()ed: the
  // thread's polling would cost an idle host a wake-up every kPoll).
  void post(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stopped_) {
        jobs_.push_back(std::move(job));
        if (sleeping_) cv_.notify_one();
        return;
      }
    }
    job();
  }

  // Runs the jobs already handed off, then ends the thread.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopped_) return;
      stopped_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

 private:
  static constexpr auto kPoll = std::chrono::microseconds(100);
  static constexpr auto kLinger = std::chrono::seconds(1);

  void loop() {
    name_this_thread("kvt-handoff");
    // Lowest priority: woken on a busy core it would otherwise preempt the very thread that
    // handed the work off, before that thread returned (measured: +33 µs on a 64 KiB
    // notification). Its jobs are small; even on a saturated host they run within milliseconds.
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 19);
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      if (!jobs_.empty()) {
        auto job = std::move(jobs_.front());
        jobs_.pop_front();
        lock.unlock();
        job();
        lock.lock();
        continue;
      }
      if (stopped_) return;
      if (watchers_ > 0 || std::chrono::steady_clock::now() < linger_until_) {
        cv_.wait_for(lock, kPoll);
      } else {
        sleeping_ = true;
        cv_.wait(lock, [this] { return stopped_ || !jobs_.empty() || watchers_ > 0; });
        sleeping_ = false;
      }
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  int watchers_ = 0;
  bool sleeping_ = false;  // in its untimed wait: only a notify wakes it
  std::chrono::steady_clock::time_point linger_until_{};
  bool stopped_ = false;
  std::thread thread_;  // last: starts after the members it uses
};

}  // namespace kvt
