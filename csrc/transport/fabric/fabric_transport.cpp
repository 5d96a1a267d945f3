#include "transport/fabric/fabric_transport.h"

#include "transport/builtin_transports.h"
#include "transport/fabric/fabric_link.h"

namespace kvt {
namespace fabric {

FabricTransport::FabricTransport(TransportContext ctx)
    : core_(std::make_shared<FabricCore>(std::move(ctx))) {}

FabricTransport::~FabricTransport() { core_->shutdown(); }

std::unique_ptr<DataLink> FabricTransport::connect(uint64_t peer, const std::string& remote_address,
                                                   uint64_t token) {
  Connection c = core_->connect(remote_address, token);
  return std::make_unique<FabricLink>(core_, peer, std::move(c));
}

}  // namespace fabric

void register_fabric_transport() {
  register_transport("fabric", [](TransportContext ctx) {
    return std::make_unique<fabric::FabricTransport>(std::move(ctx));
  });
}

}  // namespace kvt
