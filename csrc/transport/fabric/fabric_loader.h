// libfabric, loaded at run time. One build runs with Debian's libfabric here and AWS's
// /opt/amazon/efa build on EFA hosts, and a host without libfabric still imports kvtransfer and
// has TCP. Which file is loaded, in order:
//   1. a libfabric already mapped into this process (NCCL's aws-ofi-nccl plugin, a second
//      Endpoint...) - never a second copy: two copies in one process each own the NIC state;
//   2. $KVTRANSFER_LIBFABRIC (an error if it names a file other than the one in 1.);
//   3. /opt/amazon/efa/lib{,64}/libfabric.so.1 when it exists (AWS's build, with the efa provider);
//   4. "libfabric.so.1" through the ordinary library search path.
// kvtransfer/transports.py follows the same order for its ctypes probe, so `auto` and doctor see
// the library the core will use.
#pragma once

#include <cstdint>
#include <string>

namespace kvt::fabric {

struct Library {
  std::string path;          // the file actually mapped
  uint32_t version = 0;      // fi_version() of that file
  uint32_t api_version = 0;  // what we ask fi_getinfo for: min(headers, library)
  bool was_loaded = false;   // found already mapped into the process
};

// Loads libfabric once per process (thread-safe). Throws InvalidRequest, saying which file and
// why, when it cannot; later calls throw the same error.
const Library& load_library();

std::string version_string(uint32_t v);  // "1.17"

}  // namespace kvt::fabric
