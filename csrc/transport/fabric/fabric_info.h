// Which provider, which domains (NICs): turns the user's `provider=` string into one fi_info
// per rail, asking only for what the transport really uses and declaring every mode and mr_mode
// bit it honours, so the provider decides and we follow.
//
// provider string:  NAME[:DOMAIN[,DOMAIN...]]   NAME: a libfabric provider ("efa", "shm",
// "tcp;ofi_rxm") or an alias ("tcp" -> "tcp;ofi_rxm", "udp" -> "udp;ofi_rxd", "verbs" ->
// "verbs;ofi_rxm"); empty: the best available. DOMAINs: the NICs to stripe over (a name may
// repeat: two rails on one NIC); "*": every domain; none: the first. $KVTRANSFER_FABRIC_DOMAINS
// supplies the list when the string has none.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "transport/fabric/fabric_api.h"

namespace kvt::fabric {

struct InfoDeleter {
  void operator()(fi_info* i) const { fi_freeinfo(i); }
};
using InfoPtr = std::unique_ptr<fi_info, InfoDeleter>;

struct ProviderSpec {
  std::string provider;              // canonical libfabric name; empty = best available
  std::vector<std::string> domains;  // empty = first domain; {"*"} = all
};

ProviderSpec parse_provider_spec(const std::string& spec);
std::string canonical_provider(const std::string& name);

// Providers tried, in order, when none is named: hardware first, then the software ones.
const std::vector<std::string>& provider_preference();

struct Selection {
  std::string provider;          // prov_name, e.g. "tcp;ofi_rxm"
  std::vector<InfoPtr> rails;    // one fi_info (a single entry, next == nullptr) per rail
  bool rdma_read = false;        // FI_READ granted
  bool hmem = false;             // FI_HMEM granted (device memory may be registered)
  bool delivery_complete = false;  // writes complete when placed at the target
};

// listen_host binds IP-addressed providers (tcp, udp, verbs) to that interface, so loopback
// endpoints keep their traffic on loopback. Throws InvalidRequest naming what exists when the
// provider or a domain is not there; never falls back to another provider.
Selection select_rails(const ProviderSpec& spec, const std::string& listen_host);

// Every RDM provider with RMA this host offers (names, deduplicated), for error messages.
std::vector<std::string> available_providers();

}  // namespace kvt::fabric
