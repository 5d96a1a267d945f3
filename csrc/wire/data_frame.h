// The TCP data path's frames: a fixed header, `nseg` (offset, length) descriptors into the
// target region, then the payload bytes in descriptor order. The header carries a crc32c over
// itself and the descriptors, so a corrupted offset is caught before any byte lands in memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "wire/version.h"

namespace kvt::wire {

enum class DataType : uint8_t {
  kHello = 1,     // opens a data connection: token = session token
  kWrite = 2,     // initiator -> target: descs are target offsets, payload follows
  kReadReq = 3,   // initiator -> target: descs are target offsets to read, no payload
  kReadResp = 4,  // target -> initiator: payload only, for (slot, frame)
  kReadErr = 5,   // target -> initiator: payload is a UTF-8 reason
  kBegin = 6,     // initiator -> target: payload is a BEGIN body (crc flag required); sent in
                  // the same sendmsg as the one frame of a small write
};

// Header flag bits.
constexpr uint8_t kFlagPayloadCrc = 1;  // a crc32c of the payload (u32 LE) follows the payload

struct DataHeader {
  DataType type = DataType::kWrite;
  uint8_t flags = 0;
  uint32_t nseg = 0;
  uint32_t region = 0;
  uint32_t frame = 0;    // index of this frame within its transfer
  uint64_t slot = 0;     // the transfer (for kHello: the session token)
  uint64_t key = 0;      // the region's key
  uint64_t payload = 0;  // payload bytes following the descriptors
};

struct DataDesc {
  uint64_t off;
  uint64_t len;
};

constexpr size_t kDataHeaderSize = 48;
constexpr size_t kDataDescSize = 16;
constexpr uint32_t kMaxDescsPerFrame = 1000;        // below IOV_MAX with header iovecs
constexpr uint64_t kMaxReadErrBytes = 4096;
constexpr uint64_t kMaxBeginBytes = kMaxNotify + 64;  // a BEGIN: fixed fields + notify payload

// Serializes a header whose crc covers the header and `descs`.
void encode_data_header(const DataHeader& h, const DataDesc* descs, uint8_t out[kDataHeaderSize]);
// Parses and checks magic, version, type and limits; throws ProtocolError.
DataHeader decode_data_header(const uint8_t in[kDataHeaderSize]);
// Checks the header crc against the received descriptors; throws ProtocolError.
void verify_data_crc(const uint8_t in[kDataHeaderSize], const DataDesc* descs, uint32_t nseg);
void encode_descs(const DataDesc* descs, uint32_t nseg, uint8_t* out);
void decode_descs(const uint8_t* in, uint32_t nseg, DataDesc* out);

}  // namespace kvt::wire
