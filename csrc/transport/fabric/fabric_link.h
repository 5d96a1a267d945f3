// The initiator's data path to one peer over libfabric: cuts an operation into units that fit
// the provider (iov_limit local pieces, rma_iov_limit remote pieces, max_msg_size bytes),
// stripes them over lanes (local rail x peer rail pairs), and posts them with the 32-bit
// immediate that lets the target count them.
#pragma once

#include <atomic>
#include <memory>

#include "transport/fabric/fabric_core.h"
#include "transport/transport.h"

namespace kvt::fabric {

class FabricLink : public DataLink {
 public:
  // How long close() lets the provider finish what it holds before leaving it to shutdown.
  static constexpr double kDrainS = 1.0;
  // Largest unit: big enough for full-speed RMA, small enough to stripe a transfer over rails.
  static constexpr uint64_t kUnitBytes = 4ull << 20;
  static constexpr uint64_t kStripeBytes = 1ull << 20;

  FabricLink(std::shared_ptr<FabricCore> core, uint64_t peer, Connection conn);
  ~FabricLink() override;
  std::unique_ptr<PreparedOp> prepare(OpRequest op) override;
  void post(std::unique_ptr<PreparedOp> op) override;
  void close() override;

 private:
  std::shared_ptr<FabricCore> core_;
  uint64_t peer_;
  uint64_t id_;
  Connection conn_;
  std::atomic<uint32_t> next_seq_{0};
  std::atomic<bool> closed_{false};
};

}  // namespace kvt::fabric
