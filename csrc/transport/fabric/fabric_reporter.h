// Reports a write's failure a moment after the provider did. When a target refuses a transfer
// it says why on the control channel (region deregistered, wrong key) while its provider only
// drops the data - ofi_rxm even tears the connection down and cancels everything on it. Holding
// the provider's vaguer error back by kGrace lets the target's reason, which names the cause,
// end the transfer first; if it does not come, the provider's error does. One thread that
// sleeps until the next report is due (nothing to do: it waits without a timeout).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>

#include "transport/transport.h"

namespace kvt::fabric {

class DeferredReports {
 public:
  static constexpr auto kGrace = std::chrono::milliseconds(200);

  explicit DeferredReports(TransportSink& sink);
  ~DeferredReports();
  // on_op_failed(slot, error) after kGrace; then on_link_failed(peer, error) too when asked.
  void add(uint64_t slot, uint64_t peer, Error error, bool peer_lost);
  void stop();  // drops what is still waiting

 private:
  struct Report {
    std::chrono::steady_clock::time_point due;
    uint64_t slot;
    uint64_t peer;
    Error error;
    bool peer_lost;
  };
  void loop();

  TransportSink& sink_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Report> queue_;  // in due order (one constant grace)
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace kvt::fabric
