// Counters and a latency window for ep.stats(); updated from the data path with relaxed atomics
// (and one short lock per finished transfer for the latency window).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

namespace kvt {

struct StatsSnapshot {
  uint64_t bytes_written = 0, bytes_read = 0, bytes_received = 0;
  uint64_t transfers_done = 0, transfers_failed = 0;
  uint64_t inbound_done = 0, inbound_failed = 0;
  uint64_t errors = 0, peers = 0;
  uint64_t spin_reads = 0;  // inbound data read by a spinning waiter, not a transport thread
  uint64_t sleep_reads = 0;  // ... by a waiter that sleeps in the transport between reads
  double latency_p50_s = 0, latency_p99_s = 0;
  uint64_t latency_samples = 0;
};

class EndpointStats {
 public:
  std::atomic<uint64_t> bytes_written{0}, bytes_read{0}, bytes_received{0};
  std::atomic<uint64_t> transfers_done{0}, transfers_failed{0};
  std::atomic<uint64_t> inbound_done{0}, inbound_failed{0}, errors{0}, peers{0};
  std::atomic<uint64_t> spin_reads{0}, sleep_reads{0};

  void add_latency(double s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (window_.size() < kWindow) {
      window_.push_back(s);
    } else {
      window_[next_++ % kWindow] = s;
    }
  }

  StatsSnapshot snapshot() const {
    StatsSnapshot s;
    s.bytes_written = bytes_written; s.bytes_read = bytes_read; s.bytes_received = bytes_received;
    s.transfers_done = transfers_done; s.transfers_failed = transfers_failed;
    s.inbound_done = inbound_done; s.inbound_failed = inbound_failed;
    s.errors = errors; s.peers = peers;
    s.spin_reads = spin_reads;
    s.sleep_reads = sleep_reads;
    std::vector<double> w;
    {
      std::lock_guard<std::mutex> lock(mu_);
      w = window_;
    }
    s.latency_samples = w.size();
    if (!w.empty()) {
      std::sort(w.begin(), w.end());
      s.latency_p50_s = w[w.size() / 2];
      s.latency_p99_s = w[std::min(w.size() - 1, w.size() * 99 / 100)];
    }
    return s;
  }

 private:
  static constexpr size_t kWindow = 4096;
  mutable std::mutex mu_;
  std::vector<double> window_;
  size_t next_ = 0;
};

}  // namespace kvt
