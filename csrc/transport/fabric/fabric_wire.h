// Bytes the fabric transport exchanges: its address (through the Endpoint's handshake), a
// region's remote key (likewise), the 32-bit immediate each write carries, and the few small
// messages it sends over the fabric itself (session hello, slot map).
//
// Why messages at all: the immediate is 32 bits (EFA's cq_data_size is 4), and tcp;ofi_rxm
// cannot say who sent a completion (no FI_SOURCE), so the immediate must name the session as
// well as the transfer. A HELLO at connect time gets the session a 12-bit tag from the target;
// each transfer gets a per-session 20-bit number n, and a MAP message tells the target which
// 64-bit slot a write's n is (and which region it holds). Units may arrive before their MAP
// (nothing is ordered); the target counts them until it learns the slot. A read announces
// itself with READ-BEGIN and ends with RELEASE, as does a write that did not fully land.
// RETIRE / RETIRED make a deregistration wait until no initiator has a transfer into the region
// in flight before the registration closes (fabric_core.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvt::fabric {

constexpr uint32_t kTagBits = 12;
constexpr uint32_t kSeqBits = 32 - kTagBits;
constexpr uint32_t kMaxTag = (1u << kTagBits) - 1;  // tags 1..4095; 0 is never issued
constexpr uint32_t kSeqMask = (1u << kSeqBits) - 1;

inline uint32_t make_imm(uint32_t tag, uint32_t seq) { return (tag << kSeqBits) | (seq & kSeqMask); }
inline uint32_t imm_tag(uint64_t imm) { return static_cast<uint32_t>(imm >> kSeqBits) & kMaxTag; }
inline uint32_t imm_seq(uint64_t imm) { return static_cast<uint32_t>(imm) & kSeqMask; }

struct RailAddress {
  std::string domain;  // NIC name, for messages
  std::string raw;     // fi_getname() bytes, in the provider's addr_format
};

struct FabricAddress {
  std::string provider;
  std::vector<RailAddress> rails;
};
std::string encode_address(const FabricAddress& a);
FabricAddress decode_address(const std::string& bytes);

// A region's key on each of its owner's rails, and the address its offsets are added to
// (the region's virtual address under FI_MR_VIRT_ADDR, else 0): 16 bytes per rail, no header
// (versioned by the handshake that carries it; a corrupted key stays a well-formed wrong key).
struct RailKey {
  uint64_t key = 0;
  uint64_t base = 0;
};
std::string encode_rkey(const std::vector<RailKey>& keys);
std::vector<RailKey> decode_rkey(const std::string& bytes);

enum class MsgType : uint8_t {
  kHello = 1,
  kHelloAck = 2,
  kMap = 3,
  kReadBegin = 4,
  kRelease = 5,
  kRetire = 6,   // target -> initiator: region is being deregistered; answer when none of
                 // your transfers into it is in flight any more, and start no new one
  kRetired = 7,  // initiator -> target
};
constexpr size_t kMaxMsgBytes = 512;

struct Msg {
  MsgType type = MsgType::kHello;
  uint64_t token = 0;     // hello, hello-ack, retire, retired: the Endpoint's session token
  uint32_t tag = 0;       // hello-ack (0: refused), map, read-begin, release
  uint32_t seq = 0;       // map, read-begin, release: the transfer's n
  uint32_t units = 0;     // map: how many units transfer n has
  uint64_t slot = 0;      // map: the transfer's slot
  uint32_t region = 0;    // map, read-begin, retire, retired: the target region
  uint64_t key = 0;       // map, read-begin: the region's key (checked by the target)
  std::string reply_to;   // hello: the initiator's rail-0 address; hello-ack: refusal reason
};
std::string encode_msg(const Msg& m);
Msg decode_msg(const void* data, size_t len);  // throws ProtocolError on malformed input

}  // namespace kvt::fabric
