// Control messages between endpoints (handshake, transfer begin/ack, regions, notifications),
// each framed as: magic u32 | version u16 | type u16 | body length u32 | crc32c u32 | body,
// the crc32c covering the header (with its crc field zero) and then the body.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/region_registry.h"

namespace kvt::wire {

enum class MsgType : uint16_t {
  kHello = 1,       // client -> server: version, name, nonce
  kChallenge = 2,   // server -> client: version, name, nonce, auth flag, server proof
  kAuth = 3,        // client -> server: client proof
  kWelcome = 4,     // server -> client: session token, transport, address, regions
  kError = 5,       // either way: code, message; the sender then closes
  kBegin = 6,       // initiator -> target: slot, units to expect, deadline, notification
  kAck = 7,         // target -> initiator: slot, code (0 = done), message
  kAbort = 8,       // initiator -> target: slot, reason (initiator gave up)
  kNotify = 9,      // initiator -> target: a completed read's notification
  kRegionsReq = 10,
  kRegions = 11,
};

constexpr size_t kControlHeaderSize = 16;
constexpr uint32_t kMaxControlBody = 16u << 20;  // regions lists of many thousand regions fit

struct ControlHeader {
  MsgType type;
  uint32_t length;
  uint32_t crc;
  uint16_t version;
};

std::string encode_control(MsgType type, const std::string& body);
// Checks magic and length cap (throws ProtocolError); version is returned for the caller to
// judge, since the handshake must answer a mismatch with a message naming both versions.
ControlHeader decode_control_header(const uint8_t in[kControlHeaderSize]);
void verify_control_body(const ControlHeader& h, const std::string& body);

struct Hello {
  uint16_t version = 0;
  std::string name;
  std::string nonce;
  // The client's CLOCK_MONOTONIC (ns) when it sent HELLO: lets the server map the client's
  // transfer start times onto its own clock (0 from a peer that does not send it).
  uint64_t clock_ns = 0;
};
struct Challenge {
  uint16_t version = 0;
  std::string name;
  std::string nonce;
  bool auth_required = false;
  std::string proof;
};
struct Welcome {
  uint64_t token = 0;
  std::string transport;
  std::string address;
  std::vector<RemoteRegion> regions;
};
struct ErrorMsg {
  uint32_t code = 0;
  std::string message;
};
struct Begin {
  uint64_t slot = 0;
  uint32_t units = 0;
  uint32_t deadline_ms = 0;
  bool has_notify = false;
  std::string notify;
  uint64_t start_ns = 0;  // the initiator's CLOCK_MONOTONIC when the transfer started (0: unknown)
};
struct Ack {
  uint64_t slot = 0;
  uint32_t code = 0;  // 0: done; else an ErrorCode
  std::string message;
};

std::string encode(const Hello& m);
std::string encode(const Challenge& m);
std::string encode(const Welcome& m);
std::string encode(const ErrorMsg& m);
std::string encode(const Begin& m);
std::string encode(const Ack& m);
std::string encode_regions(const std::vector<RemoteRegion>& regions);
std::string encode_bytes(const std::string& b);  // kAuth / kAbort / kNotify bodies

Hello decode_hello(const std::string& body);
Challenge decode_challenge(const std::string& body);
Welcome decode_welcome(const std::string& body);
ErrorMsg decode_error(const std::string& body);
Begin decode_begin(const std::string& body);
Ack decode_ack(const std::string& body);
std::vector<RemoteRegion> decode_regions(const std::string& body);
std::string decode_bytes(const std::string& body, size_t cap);
// kAbort / kNotify: slot then bytes.
std::string encode_slot_bytes(uint64_t slot, const std::string& b);
std::pair<uint64_t, std::string> decode_slot_bytes(const std::string& body, size_t cap);

// Endpoint info blob (ep.info()): how to reach an endpoint, what it exposes (no keys: those
// are only handed out after the handshake, authenticated when a token is set).
struct EndpointInfo {
  std::string name;
  std::string address;
  std::string transport;
  std::vector<std::pair<uint32_t, uint64_t>> regions;  // id, nbytes
};
std::string encode_info(const EndpointInfo& info);
EndpointInfo decode_info(const std::string& blob);

}  // namespace kvt::wire
