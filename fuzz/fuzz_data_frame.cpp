// TCP data frames: the 48-byte header, `nseg` 16-byte descriptors, and the crc32c over both,
// in the order the transport runs them (csrc/transport/tcp/tcp_transport.cpp serve_frames).
// A header that decodes must re-encode to a header that decodes to the same fields and passes
// its own crc check; a frame whose crc verifies must re-encode to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "wire/data_frame.h"

using namespace kvt::wire;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kDataHeaderSize) return 0;
  DataHeader h;
  if (!fuzz::decodes([&] { h = decode_data_header(data); })) return 0;
  FUZZ_CHECK(h.nseg <= kMaxDescsPerFrame);
  size_t avail = (size - kDataHeaderSize) / kDataDescSize;
  uint32_t n = static_cast<uint32_t>(std::min<size_t>(h.nseg, avail));
  std::vector<DataDesc> descs(n);
  decode_descs(data + kDataHeaderSize, n, descs.data());
  bool crc_ok = fuzz::decodes([&] { verify_data_crc(data, descs.data(), n); });

  // Round trip through the encoder.
  DataHeader e = h;
  e.nseg = n;
  uint8_t out[kDataHeaderSize];
  encode_data_header(e, descs.data(), out);
  DataHeader r = decode_data_header(out);
  FUZZ_CHECK(r.type == e.type && r.flags == e.flags && r.nseg == e.nseg && r.region == e.region &&
             r.frame == e.frame && r.slot == e.slot && r.key == e.key && r.payload == e.payload);
  verify_data_crc(out, descs.data(), n);  // must not throw
  std::vector<uint8_t> raw(static_cast<size_t>(n) * kDataDescSize);
  encode_descs(descs.data(), n, raw.data());
  FUZZ_CHECK(n == 0 || std::memcmp(raw.data(), data + kDataHeaderSize, raw.size()) == 0);
  if (crc_ok && n == h.nseg) {
    FUZZ_CHECK(std::memcmp(out, data, kDataHeaderSize) == 0);
  }
  return 0;
}
