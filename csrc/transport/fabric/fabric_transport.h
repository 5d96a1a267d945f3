// libfabric transport: FI_EP_RDM endpoints, one-sided writes carrying a 32-bit immediate that
// the target counts, reads completing at the initiator. Design notes: docs/transports.md.
#pragma once

#include <memory>

#include "transport/fabric/fabric_core.h"
#include "transport/transport.h"

namespace kvt::fabric {

class FabricTransport : public Transport {
 public:
  explicit FabricTransport(TransportContext ctx);
  ~FabricTransport() override;

  TransportCaps caps() const override { return core_->caps(); }
  std::string address() const override { return core_->address(); }
  std::string register_region(const Region& region) override { return core_->register_region(region); }
  void deregister_region(const Region& region) override { core_->deregister_region(region); }
  void accept_session(uint64_t peer, uint64_t token) override { core_->accept_session(peer, token); }
  void end_session(uint64_t peer) override { core_->end_session(peer); }
  std::unique_ptr<DataLink> connect(uint64_t peer, const std::string& remote_address,
                                    uint64_t token) override;
  void shutdown() override { core_->shutdown(); }

 private:
  std::shared_ptr<FabricCore> core_;
};

}  // namespace kvt::fabric
