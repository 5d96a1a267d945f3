// The initiator's view of one transfer: PENDING until the target acknowledges (or, for a read,
// until every unit has landed), then DONE or ERROR exactly once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "core/error.h"
#include "core/region_registry.h"
#include "transport/transport.h"

namespace kvt {

enum class TransferStatus { kPending = 0, kDone = 1, kError = 2 };
using Clock = std::chrono::steady_clock;

class TransferState {
 public:
  TransferState(uint64_t slot, uint64_t peer, OpKind kind, uint64_t bytes, double timeout_s)
      : slot(slot), peer(peer), kind(kind), bytes(bytes), start(Clock::now()),
        deadline(start + std::chrono::duration_cast<Clock::duration>(
                              std::chrono::duration<double>(timeout_s))) {}

  const uint64_t slot;
  const uint64_t peer;
  const OpKind kind;
  const uint64_t bytes;
  const Clock::time_point start;
  const Clock::time_point deadline;

  // Read bookkeeping (set before posting, then only counted).
  uint32_t units_expected = 0;
  std::atomic<uint32_t> units_landed{0};
  bool has_notify = false;
  std::string notify;
  std::shared_ptr<const Region> hold;  // local memory stays registered until the end

  // Returns true for the call that ended the transfer; later calls change nothing, so a late
  // ACK can never turn an ERROR into DONE.
  bool finish(TransferStatus s, ErrorCode code = ErrorCode::kTransport, std::string error = {}) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (status_ != TransferStatus::kPending) return false;
      status_ = s;
      code_ = code;
      error_ = std::move(error);
      latency_s_ = std::chrono::duration<double>(Clock::now() - start).count();
      hold.reset();
    }
    cv_.notify_all();
    return true;
  }

  TransferStatus status() const {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  // Blocks until the transfer ends or `timeout_s` passes (negative: no limit); true if ended.
  bool wait(double timeout_s) {
    std::unique_lock<std::mutex> lock(mu_);
    auto ended = [&] { return status_ != TransferStatus::kPending; };
    if (timeout_s < 0) {
      cv_.wait(lock, ended);
      return true;
    }
    return cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ended);
  }
  ErrorCode code() const {
    std::lock_guard<std::mutex> lock(mu_);
    return code_;
  }
  std::string error() const {
    std::lock_guard<std::mutex> lock(mu_);
    return error_;
  }
  double latency_s() const {
    std::lock_guard<std::mutex> lock(mu_);
    return latency_s_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  TransferStatus status_ = TransferStatus::kPending;
  ErrorCode code_ = ErrorCode::kTransport;
  std::string error_;
  double latency_s_ = 0;
};

}  // namespace kvt
