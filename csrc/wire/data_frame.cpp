#include "wire/data_frame.h"

#include <cstring>

#include "core/error.h"
#include "wire/codec.h"
#include "wire/crc32c.h"
#include "wire/version.h"

namespace kvt::wire {
namespace {

// Layout (little-endian): magic u32 | version u16 | type u8 | flags u8 | nseg u32 | region u32 |
// frame u32 | crc u32 | slot u64 | key u64 | payload u64  = 48 bytes.
constexpr size_t kCrcAt = 20;

uint32_t frame_crc(const uint8_t* hdr, const DataDesc* descs, uint32_t nseg) {
  uint8_t copy[kDataHeaderSize];
  std::memcpy(copy, hdr, kDataHeaderSize);
  put_le(copy + kCrcAt, 0, 4);
  uint32_t crc = crc32c(copy, kDataHeaderSize);
  uint8_t raw[kDataDescSize];
  for (uint32_t i = 0; i < nseg; ++i) {
    encode_descs(descs + i, 1, raw);
    crc = crc32c(raw, kDataDescSize, crc);
  }
  return crc;
}

}  // namespace

void encode_descs(const DataDesc* descs, uint32_t nseg, uint8_t* out) {
  for (uint32_t i = 0; i < nseg; ++i) {
    put_le(out + i * kDataDescSize, descs[i].off, 8);
    put_le(out + i * kDataDescSize + 8, descs[i].len, 8);
  }
}

void decode_descs(const uint8_t* in, uint32_t nseg, DataDesc* out) {
  for (uint32_t i = 0; i < nseg; ++i) {
    out[i].off = get_le(in + i * kDataDescSize, 8);
    out[i].len = get_le(in + i * kDataDescSize + 8, 8);
  }
}

void encode_data_header(const DataHeader& h, const DataDesc* descs, uint8_t out[kDataHeaderSize]) {
  std::memset(out, 0, kDataHeaderSize);
  put_le(out, kDataMagic, 4);
  put_le(out + 4, kProtocolVersion, 2);
  out[6] = static_cast<uint8_t>(h.type);
  out[7] = h.flags;
  put_le(out + 8, h.nseg, 4);
  put_le(out + 12, h.region, 4);
  put_le(out + 16, h.frame, 4);
  put_le(out + 24, h.slot, 8);
  put_le(out + 32, h.key, 8);
  put_le(out + 40, h.payload, 8);
  put_le(out + kCrcAt, frame_crc(out, descs, h.nseg), 4);
}

DataHeader decode_data_header(const uint8_t in[kDataHeaderSize]) {
  if (get_le(in, 4) != kDataMagic) {
    fail(ErrorCode::kProtocol, "data frame with bad magic (not a kvtransfer peer?)");
  }
  auto version = static_cast<uint16_t>(get_le(in + 4, 2));
  if (version != kProtocolVersion) {
    fail(ErrorCode::kProtocol, "data frame of protocol version " + std::to_string(version) +
                                   "; this endpoint speaks version " +
                                   std::to_string(kProtocolVersion));
  }
  DataHeader h;
  uint8_t t = in[6];
  if (t < 1 || t > 6) fail(ErrorCode::kProtocol, "data frame of unknown type " + std::to_string(t));
  h.type = static_cast<DataType>(t);
  h.flags = in[7];
  if (h.flags & ~kFlagPayloadCrc) {
    fail(ErrorCode::kProtocol, "data frame with unknown flags 0x" + std::to_string(h.flags));
  }
  h.nseg = static_cast<uint32_t>(get_le(in + 8, 4));
  h.region = static_cast<uint32_t>(get_le(in + 12, 4));
  h.frame = static_cast<uint32_t>(get_le(in + 16, 4));
  h.slot = get_le(in + 24, 8);
  h.key = get_le(in + 32, 8);
  h.payload = get_le(in + 40, 8);
  if (h.nseg > kMaxDescsPerFrame) {
    fail(ErrorCode::kProtocol, "data frame claims " + std::to_string(h.nseg) +
                                   " segments, over the limit of " +
                                   std::to_string(kMaxDescsPerFrame));
  }
  return h;
}

void verify_data_crc(const uint8_t in[kDataHeaderSize], const DataDesc* descs, uint32_t nseg) {
  auto sent = static_cast<uint32_t>(get_le(in + kCrcAt, 4));
  if (frame_crc(in, descs, nseg) != sent) {
    fail(ErrorCode::kProtocol, "data frame header or descriptors fail their crc32c (corrupted)");
  }
}

}  // namespace kvt::wire
