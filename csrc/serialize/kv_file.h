// The KV offload file (kvtransfer.serialize_blocks / deserialize_blocks): a self-describing
// header, then one record per block, each with its own crc32c (docs/wire-format.md, "KV file").
// This is the only code that encodes or decodes those bytes; Python moves the block data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvt::serialize {

constexpr uint32_t kKvFileMagic = 0x4654564B;    // "KVTF" little-endian
constexpr uint32_t kKvRecordMagic = 0x4254564B;  // "KVTB"
constexpr uint16_t kKvFileVersion = 1;
constexpr size_t kKvPreambleSize = 12;           // magic u32 | version u16 | flags u16 | length u32
constexpr size_t kKvRecordHeaderSize = 16;       // magic u32 | seq u32 | source block u64
constexpr size_t kKvRecordTrailerSize = 4;       // crc32c u32
constexpr uint32_t kMaxKvHeader = 1u << 20;
constexpr uint16_t kKvFlagScales = 1;            // each record carries float32 scales
constexpr uint64_t kMaxKvBlockBytes = 1ull << 36;  // 64 GiB: a sanity cap, not a real limit
constexpr uint64_t kMaxKvBlocks = 1ull << 32;
constexpr uint32_t kMaxKvScales = 1u << 16;

struct KvFileHeader {
  uint16_t version = kKvFileVersion;
  uint16_t flags = 0;
  std::string dtype;         // canonical name: "float16", "bfloat16", ...
  uint32_t itemsize = 0;
  uint32_t num_layers = 0;
  uint32_t kv_parts = 0;     // 2: K and V planes; 1: one latent plane (MLA)
  uint32_t block_size = 0;   // tokens per block
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;     // elements
  uint64_t block_bytes = 0;  // = layers * parts * block_size * heads * head_dim * itemsize
  uint64_t num_blocks = 0;   // records that follow
  uint32_t scale_count = 0;  // float32 scales per record (0 unless kKvFlagScales)
  std::string fingerprint;   // KVLayout.fingerprint() of the source
  std::string layout;        // the source's KVLayout.to_dict() as JSON (informational)
};

// The whole header: preamble, fields, crc32c of everything before it.
std::string encode_kv_header(const KvFileHeader& h);
// Reads the 12-byte preamble: checks magic and version, returns the header's total length
// (preamble included), at most kMaxKvHeader. Throws ProtocolError.
uint32_t kv_header_length(const uint8_t preamble[kKvPreambleSize]);
// Decodes and checks a whole header (its crc, field caps, block_bytes = product of the
// geometry). Bytes after the known fields are ignored (appended by newer minor versions).
KvFileHeader decode_kv_header(const uint8_t* data, size_t len);

// Bytes of one record: header, scales, block data, crc.
uint64_t kv_record_bytes(const KvFileHeader& h);
// Fills in a record's header and crc; `rec` holds kv_record_bytes() bytes with scales and data
// already in place.
void seal_kv_record(uint8_t* rec, size_t len, uint32_t seq, uint64_t source_block);
// Checks a record's magic, sequence number and crc; returns its source block id. Throws a
// ProtocolError naming record `seq`.
uint64_t open_kv_record(const uint8_t* rec, size_t len, uint32_t seq);

}  // namespace kvt::serialize
