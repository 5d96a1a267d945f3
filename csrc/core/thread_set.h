// Owns the threads that serve connections: each runs until its socket closes; finished ones are
// joined whenever a new one starts, so 10,000 connect/close cycles leave no threads behind.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <thread>

#include "core/thread_name.h"

namespace kvt {

class ThreadSet {
 public:
  ~ThreadSet() { join_all(); }

  // Starts fn() on a thread named `name` (a string literal: name_this_thread).
  void spawn(const char* name, std::function<void()> fn) {
    auto done = std::make_shared<std::atomic<bool>>(false);
    std::thread t([name, fn = std::move(fn), done] {
      name_this_thread(name);
      fn();
      done->store(true);
    });
    std::list<Entry> finished;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = threads_.begin(); it != threads_.end();) {
        if (it->done->load()) {
          finished.splice(finished.end(), threads_, it++);
        } else {
          ++it;
        }
      }
      threads_.push_back(Entry{std::move(t), done});
    }
    for (auto& e : finished) e.thread.join();
  }

  // Callers must first make every thread's blocking call return (close its socket).
  void join_all() {
    std::list<Entry> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(threads_);
    }
    for (auto& e : all) {
      if (e.thread.get_id() == std::this_thread::get_id()) {
        e.thread.detach();  // a serving thread closing its own endpoint
      } else if (e.thread.joinable()) {
        e.thread.join();
      }
    }
  }

 private:
  struct Entry {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex mu_;
  std::list<Entry> threads_;
};

}  // namespace kvt
