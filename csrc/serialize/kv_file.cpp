#include "serialize/kv_file.h"

#include "core/error.h"
#include "wire/codec.h"
#include "wire/crc32c.h"

namespace kvt::serialize {
namespace {

using wire::get_le;
using wire::put_le;

constexpr size_t kMaxDtype = 32;
constexpr size_t kMaxFingerprint = 128;
constexpr size_t kMaxLayout = 64 * 1024;

// a * b, or fails when it overflows or passes `cap`.
uint64_t mul_capped(uint64_t a, uint64_t b, uint64_t cap, const char* what) {
  if (b != 0 && a > cap / b) {
    fail(ErrorCode::kProtocol, std::string("KV file header: ") + what + " exceeds the limit of " +
                                   std::to_string(cap) + " bytes");
  }
  return a * b;
}

}  // namespace

std::string encode_kv_header(const KvFileHeader& h) {
  wire::Writer w;
  w.u32(kKvFileMagic);
  w.u16(h.version);
  w.u16(h.flags);
  w.u32(0);  // total length, patched below
  w.bytes(h.dtype);
  w.u32(h.itemsize);
  w.u32(h.num_layers);
  w.u32(h.kv_parts);
  w.u32(h.block_size);
  w.u32(h.num_kv_heads);
  w.u32(h.head_dim);
  w.u64(h.block_bytes);
  w.u64(h.num_blocks);
  w.u32(h.scale_count);
  w.bytes(h.fingerprint);
  w.bytes(h.layout);
  std::string& out = w.str();
  put_le(reinterpret_cast<uint8_t*>(out.data()) + 8, out.size() + 4, 4);
  uint32_t crc = wire::crc32c(out.data(), out.size());
  w.u32(crc);
  return std::move(out);
}

uint32_t kv_header_length(const uint8_t preamble[kKvPreambleSize]) {
  if (get_le(preamble, 4) != kKvFileMagic) {
    fail(ErrorCode::kProtocol, "not a kvtransfer KV file (bad magic)");
  }
  auto version = static_cast<uint16_t>(get_le(preamble + 4, 2));
  if (version != kKvFileVersion) {
    fail(ErrorCode::kProtocol, "KV file of format version " + std::to_string(version) +
                                   "; this build reads version " + std::to_string(kKvFileVersion));
  }
  auto len = static_cast<uint32_t>(get_le(preamble + 8, 4));
  if (len < kKvPreambleSize + 4 || len > kMaxKvHeader) {
    fail(ErrorCode::kProtocol, "KV file header claims " + std::to_string(len) +
                                   " bytes (allowed: 16 to " + std::to_string(kMaxKvHeader) + ")");
  }
  return len;
}

KvFileHeader decode_kv_header(const uint8_t* data, size_t len) {
  if (len < kKvPreambleSize) fail(ErrorCode::kProtocol, "KV file header: truncated");
  uint32_t total = kv_header_length(data);
  if (len < total) {
    fail(ErrorCode::kProtocol, "KV file header: truncated (" + std::to_string(len) + " of " +
                                   std::to_string(total) + " bytes)");
  }
  uint32_t sent = static_cast<uint32_t>(get_le(data + total - 4, 4));
  if (wire::crc32c(data, total - 4) != sent) {
    fail(ErrorCode::kProtocol, "KV file header fails its crc32c (corrupted)");
  }
  wire::Reader rd(data, total - 4, "KV file header");
  rd.u32();  // magic, checked
  KvFileHeader h;
  h.version = rd.u16();
  h.flags = rd.u16();
  rd.u32();  // length, checked
  if (h.flags & ~kKvFlagScales) {
    fail(ErrorCode::kProtocol, "KV file header has unknown flags " + std::to_string(h.flags) +
                               " (written by a newer kvtransfer?)");
  }
  h.dtype = rd.bytes(kMaxDtype);
  h.itemsize = rd.u32();
  h.num_layers = rd.u32();
  h.kv_parts = rd.u32();
  h.block_size = rd.u32();
  h.num_kv_heads = rd.u32();
  h.head_dim = rd.u32();
  h.block_bytes = rd.u64();
  h.num_blocks = rd.u64();
  h.scale_count = rd.u32();
  h.fingerprint = rd.bytes(kMaxFingerprint);
  h.layout = rd.bytes(kMaxLayout);
  // Trailing bytes before the crc: fields appended by a newer minor version, ignored.
  if (h.itemsize != 1 && h.itemsize != 2 && h.itemsize != 4 && h.itemsize != 8) {
    fail(ErrorCode::kProtocol, "KV file header: itemsize " + std::to_string(h.itemsize) +
                                   " is not 1, 2, 4 or 8");
  }
  if (h.kv_parts != 1 && h.kv_parts != 2) {
    fail(ErrorCode::kProtocol, "KV file header: kv_parts " + std::to_string(h.kv_parts) +
                                   " is not 1 or 2");
  }
  if (h.num_layers == 0 || h.block_size == 0 || h.num_kv_heads == 0 || h.head_dim == 0) {
    fail(ErrorCode::kProtocol, "KV file header: a zero dimension (layers, block size, heads or "
                               "head_dim)");
  }
  uint64_t b = h.itemsize;
  for (uint32_t d : {h.num_layers, h.kv_parts, h.block_size, h.num_kv_heads, h.head_dim}) {
    b = mul_capped(b, d, kMaxKvBlockBytes, "block size");
  }
  if (b != h.block_bytes) {
    fail(ErrorCode::kProtocol, "KV file header: block_bytes " + std::to_string(h.block_bytes) +
                                   " does not match its geometry (" + std::to_string(b) + ")");
  }
  if (h.num_blocks > kMaxKvBlocks) {
    fail(ErrorCode::kProtocol, "KV file header: " + std::to_string(h.num_blocks) +
                                   " blocks, over the limit of " + std::to_string(kMaxKvBlocks));
  }
  bool scales = h.flags & kKvFlagScales;
  if (h.scale_count > kMaxKvScales || (h.scale_count != 0) != scales) {
    fail(ErrorCode::kProtocol, "KV file header: scale count " + std::to_string(h.scale_count) +
                                   (scales ? " with" : " without") + " the scales flag");
  }
  return h;
}

uint64_t kv_record_bytes(const KvFileHeader& h) {
  return kKvRecordHeaderSize + 4ull * h.scale_count + h.block_bytes + kKvRecordTrailerSize;
}

void seal_kv_record(uint8_t* rec, size_t len, uint32_t seq, uint64_t source_block) {
  if (len < kKvRecordHeaderSize + kKvRecordTrailerSize) {
    fail(ErrorCode::kInvalidRequest, "KV record buffer of " + std::to_string(len) + " bytes is too small");
  }
  put_le(rec, kKvRecordMagic, 4);
  put_le(rec + 4, seq, 4);
  put_le(rec + 8, source_block, 8);
  put_le(rec + len - 4, wire::crc32c(rec, len - 4), 4);
}

uint64_t open_kv_record(const uint8_t* rec, size_t len, uint32_t seq) {
  const std::string what = "KV file record " + std::to_string(seq);
  if (len < kKvRecordHeaderSize + kKvRecordTrailerSize) {
    fail(ErrorCode::kProtocol, what + ": truncated (" + std::to_string(len) + " bytes)");
  }
  if (get_le(rec, 4) != kKvRecordMagic) {
    fail(ErrorCode::kProtocol, what + ": bad record magic (file corrupted or truncated)");
  }
  auto got = static_cast<uint32_t>(get_le(rec + 4, 4));
  if (got != seq) {
    fail(ErrorCode::kProtocol, what + ": sequence number " + std::to_string(got) +
                                   " (records out of order or corrupted)");
  }
  if (wire::crc32c(rec, len - 4) != static_cast<uint32_t>(get_le(rec + len - 4, 4))) {
    fail(ErrorCode::kProtocol, what + ": fails its crc32c (corrupted)");
  }
  return get_le(rec + 8, 8);
}

}  // namespace kvt::serialize
