#pragma once

namespace kvt {

// Fills the name -> factory registry with what this build has (tcp and cma always; fabric when built).
void register_builtin_transports();
#ifdef KVT_HAVE_FABRIC
void register_fabric_transport();  // transport/fabric/
#endif

}  // namespace kvt
