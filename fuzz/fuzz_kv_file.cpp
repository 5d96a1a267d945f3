// The KV offload file (kvtransfer.serialize): preamble, header (crc, caps, geometry), then the
// records the header announces, as kvtransfer/serialize.py reads them. Records are checked in
// place (the reader never allocates from a length in the file). A header that decodes must
// re-encode to one that decodes the same. Each input is tried as is and again with its header
// crc32c fixed up, so mutations also reach the checks behind the checksum.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common.h"
#include "serialize/kv_file.h"
#include "wire/crc32c.h"

using namespace kvt::serialize;

namespace {

void file(const uint8_t* data, size_t size, uint32_t hlen) {
  KvFileHeader h;
  if (!fuzz::decodes([&] { h = decode_kv_header(data, size); })) return;
  FUZZ_CHECK(h.block_bytes <= kMaxKvBlockBytes && h.num_blocks <= kMaxKvBlocks);
  std::string again = encode_kv_header(h);
  KvFileHeader r = decode_kv_header(reinterpret_cast<const uint8_t*>(again.data()), again.size());
  FUZZ_CHECK(r.flags == h.flags && r.dtype == h.dtype && r.itemsize == h.itemsize &&
             r.num_layers == h.num_layers && r.kv_parts == h.kv_parts &&
             r.block_size == h.block_size && r.num_kv_heads == h.num_kv_heads &&
             r.head_dim == h.head_dim && r.block_bytes == h.block_bytes &&
             r.num_blocks == h.num_blocks && r.scale_count == h.scale_count &&
             r.fingerprint == h.fingerprint && r.layout == h.layout);
  uint64_t rec = kv_record_bytes(h);
  size_t at = hlen;
  for (uint64_t seq = 0; seq < h.num_blocks && size - at >= rec; ++seq) {
    fuzz::decodes([&] { open_kv_record(data + at, rec, static_cast<uint32_t>(seq)); });
    at += rec;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kKvPreambleSize) return 0;
  uint32_t hlen = 0;
  if (!fuzz::decodes([&] { hlen = kv_header_length(data); })) return 0;
  FUZZ_CHECK(hlen <= kMaxKvHeader);
  file(data, size, hlen);
  if (size >= hlen) {
    std::string fixed(reinterpret_cast<const char*>(data), size);
    auto* p = reinterpret_cast<uint8_t*>(fixed.data());
    fuzz::put_le32(p + hlen - 4, kvt::wire::crc32c(p, hlen - 4));
    file(p, size, hlen);
  }
  return 0;
}
