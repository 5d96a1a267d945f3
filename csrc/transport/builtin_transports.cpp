#include "transport/builtin_transports.h"

#include "transport/cma/cma_transport.h"
#include "transport/tcp/tcp_transport.h"
#include "transport/transport.h"

namespace kvt {

void register_builtin_transports() {
  register_transport("tcp", [](TransportContext ctx) {
    return std::make_unique<tcp::TcpTransport>(std::move(ctx));
  });
  register_transport("cma", [](TransportContext ctx) {
    return std::make_unique<cma::CmaTransport>(std::move(ctx));
  });
#ifdef KVT_HAVE_FABRIC
  register_fabric_transport();
#endif
}

}  // namespace kvt
