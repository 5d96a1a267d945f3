// The endpoint info blob (ep.info(), passed to connect()): magic, version, name, address,
// transport, region list. A blob that decodes must re-encode to one that decodes the same.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common.h"
#include "wire/control.h"

using namespace kvt::wire;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string blob(reinterpret_cast<const char*>(data), size);
  EndpointInfo info;
  // Bad magic is the caller's mistake (InvalidRequest); anything else is a ProtocolError.
  if (!fuzz::decodes([&] { info = decode_info(blob); }, kvt::ErrorCode::kProtocol,
                     kvt::ErrorCode::kInvalidRequest)) {
    return 0;
  }
  FUZZ_CHECK(info.regions.size() <= size / 12);
  EndpointInfo r = decode_info(encode_info(info));
  FUZZ_CHECK(r.name == info.name && r.address == info.address && r.transport == info.transport &&
             r.regions == info.regions);
  return 0;
}
