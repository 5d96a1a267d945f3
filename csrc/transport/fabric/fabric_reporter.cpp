#include "transport/fabric/fabric_reporter.h"

#include "core/thread_name.h"

namespace kvt::fabric {

DeferredReports::DeferredReports(TransportSink& sink) : sink_(sink) {
  thread_ = std::thread([this] {
    name_this_thread("kvt-fab-report");
    loop();
  });
}

DeferredReports::~DeferredReports() { stop(); }

void DeferredReports::add(uint64_t slot, uint64_t peer, Error error, bool peer_lost) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    queue_.push_back(Report{std::chrono::steady_clock::now() + kGrace, slot, peer,
                            std::move(error), peer_lost});
  }
  cv_.notify_one();
}

void DeferredReports::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void DeferredReports::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    if (queue_.empty()) {
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      continue;
    }
    if (std::chrono::steady_clock::now() < queue_.front().due) {
      cv_.wait_until(lock, queue_.front().due);
      continue;
    }
    Report r = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    sink_.on_op_failed(r.slot, r.error);  // a no-op when the target's reason ended it first
    if (r.peer_lost) sink_.on_link_failed(r.peer, r.error);
    lock.lock();
  }
}

}  // namespace kvt::fabric
