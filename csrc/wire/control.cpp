#include "wire/control.h"

#include "core/error.h"
#include "wire/codec.h"
#include "wire/crc32c.h"
#include "wire/version.h"

namespace kvt::wire {
namespace {

constexpr size_t kMaxName = 256;
constexpr size_t kMaxAddress = 1024;
constexpr size_t kMaxNonce = 64;
constexpr size_t kMaxMessage = 64 * 1024;
constexpr size_t kMaxRkey = 1024;
constexpr uint32_t kMaxRegions = 1u << 20;

void put_regions(Writer& w, const std::vector<RemoteRegion>& regions) {
  w.u32(static_cast<uint32_t>(regions.size()));
  for (const auto& r : regions) {
    w.u32(r.id);
    w.u64(r.key);
    w.u64(r.nbytes);
    w.u64(r.base);
    w.u8(static_cast<uint8_t>((r.remote_write ? 1 : 0) | (r.remote_read ? 2 : 0)));
    w.bytes(r.rkey);
  }
}

std::vector<RemoteRegion> get_regions(Reader& rd) {
  uint32_t n = rd.u32();
  // Each entry is at least 33 bytes: refuse counts the body cannot hold before reserving.
  if (n > kMaxRegions || n > rd.remaining() / 33) {
    fail(ErrorCode::kProtocol, "regions list claims " + std::to_string(n) + " entries in " +
                                   std::to_string(rd.remaining()) + " bytes");
  }
  std::vector<RemoteRegion> out(n);
  for (auto& r : out) {
    r.id = rd.u32();
    r.key = rd.u64();
    r.nbytes = rd.u64();
    r.base = rd.u64();
    uint8_t flags = rd.u8();
    r.remote_write = flags & 1;
    r.remote_read = flags & 2;
    r.rkey = rd.bytes(kMaxRkey);
  }
  return out;
}

// The frame's crc32c covers its header (crc field as zero) and then its body, so a flipped type,
// version or length bit is caught like a flipped body bit. The header fields determine the
// header bytes exactly, so the receiver recomputes it from the decoded fields.
uint32_t frame_crc(uint16_t version, uint16_t type, uint32_t length, const std::string& body) {
  Writer w;
  w.u32(kControlMagic);
  w.u16(version);
  w.u16(type);
  w.u32(length);
  w.u32(0);
  return crc32c(body.data(), body.size(), crc32c(w.str().data(), w.size()));
}

}  // namespace

std::string encode_control(MsgType type, const std::string& body) {
  const auto t = static_cast<uint16_t>(type);
  const auto length = static_cast<uint32_t>(body.size());
  Writer w;
  w.u32(kControlMagic);
  w.u16(kProtocolVersion);
  w.u16(t);
  w.u32(length);
  w.u32(frame_crc(kProtocolVersion, t, length, body));
  w.raw(body.data(), body.size());
  return std::move(w.str());
}

ControlHeader decode_control_header(const uint8_t in[kControlHeaderSize]) {
  Reader rd(in, kControlHeaderSize, "control frame header");
  if (rd.u32() != kControlMagic) {
    fail(ErrorCode::kProtocol, "control frame with bad magic (not a kvtransfer peer?)");
  }
  ControlHeader h{};
  h.version = rd.u16();
  uint16_t type = rd.u16();
  if (type < 1 || type > static_cast<uint16_t>(MsgType::kRegions)) {
    fail(ErrorCode::kProtocol, "control message of unknown type " + std::to_string(type));
  }
  h.type = static_cast<MsgType>(type);
  h.length = rd.u32();
  h.crc = rd.u32();
  if (h.length > kMaxControlBody) {
    fail(ErrorCode::kProtocol, "control message claims " + std::to_string(h.length) +
                                   " bytes, over the limit of " + std::to_string(kMaxControlBody));
  }
  return h;
}

void verify_control_body(const ControlHeader& h, const std::string& body) {
  if (frame_crc(h.version, static_cast<uint16_t>(h.type), h.length, body) != h.crc) {
    fail(ErrorCode::kProtocol, "control message fails its crc32c (corrupted)");
  }
}

std::string encode(const Hello& m) {
  Writer w;
  w.u16(m.version);
  w.bytes(m.name);
  w.bytes(m.nonce);
  w.u64(m.clock_ns);
  return std::move(w.str());
}

// Body decoders read the fields they know and ignore any bytes after them: a newer minor
// version may append fields, and an older peer skips them (docs/wire-format.md, "Versions").
// Every length and count is checked against a cap and against the bytes present first.

Hello decode_hello(const std::string& body) {
  Reader rd(body, "HELLO");
  Hello m;
  m.version = rd.u16();
  m.name = rd.bytes(kMaxName);
  m.nonce = rd.bytes(kMaxNonce);
  if (rd.remaining() >= 8) m.clock_ns = rd.u64();
  return m;  // trailing bytes allowed: newer minor versions may append fields
}

std::string encode(const Challenge& m) {
  Writer w;
  w.u16(m.version);
  w.bytes(m.name);
  w.bytes(m.nonce);
  w.u8(m.auth_required ? 1 : 0);
  w.bytes(m.proof);
  return std::move(w.str());
}

Challenge decode_challenge(const std::string& body) {
  Reader rd(body, "CHALLENGE");
  Challenge m;
  m.version = rd.u16();
  m.name = rd.bytes(kMaxName);
  m.nonce = rd.bytes(kMaxNonce);
  m.auth_required = rd.u8() != 0;
  m.proof = rd.bytes(kMaxNonce);
  return m;
}

std::string encode(const Welcome& m) {
  Writer w;
  w.u64(m.token);
  w.bytes(m.transport);
  w.bytes(m.address);
  put_regions(w, m.regions);
  return std::move(w.str());
}

Welcome decode_welcome(const std::string& body) {
  Reader rd(body, "WELCOME");
  Welcome m;
  m.token = rd.u64();
  m.transport = rd.bytes(kMaxName);
  m.address = rd.bytes(kMaxAddress);
  m.regions = get_regions(rd);
  return m;
}

std::string encode(const ErrorMsg& m) {
  Writer w;
  w.u32(m.code);
  w.bytes(m.message);
  return std::move(w.str());
}

ErrorMsg decode_error(const std::string& body) {
  Reader rd(body, "ERROR");
  ErrorMsg m;
  m.code = rd.u32();
  m.message = rd.bytes(kMaxMessage);
  return m;
}

std::string encode(const Begin& m) {
  Writer w(8 + 4 + 4 + 1 + 4 + m.notify.size() + 8);
  w.u64(m.slot);
  w.u32(m.units);
  w.u32(m.deadline_ms);
  w.u8(m.has_notify ? 1 : 0);
  w.bytes(m.notify);
  w.u64(m.start_ns);
  return std::move(w.str());
}

Begin decode_begin(const std::string& body) {
  Reader rd(body, "BEGIN");
  Begin m;
  m.slot = rd.u64();
  m.units = rd.u32();
  m.deadline_ms = rd.u32();
  m.has_notify = rd.u8() != 0;
  m.notify = rd.bytes(kMaxNotify);
  if (rd.remaining() >= 8) m.start_ns = rd.u64();
  return m;
}

std::string encode(const Ack& m) {
  Writer w;
  w.u64(m.slot);
  w.u32(m.code);
  w.bytes(m.message);
  return std::move(w.str());
}

Ack decode_ack(const std::string& body) {
  Reader rd(body, "ACK");
  Ack m;
  m.slot = rd.u64();
  m.code = rd.u32();
  m.message = rd.bytes(kMaxMessage);
  return m;
}

std::string encode_regions(const std::vector<RemoteRegion>& regions) {
  Writer w;
  put_regions(w, regions);
  return std::move(w.str());
}

std::vector<RemoteRegion> decode_regions(const std::string& body) {
  Reader rd(body, "REGIONS");
  return get_regions(rd);
}

std::string encode_bytes(const std::string& b) {
  Writer w;
  w.bytes(b);
  return std::move(w.str());
}

std::string decode_bytes(const std::string& body, size_t cap) {
  Reader rd(body, "message");
  return rd.bytes(cap);
}

std::string encode_slot_bytes(uint64_t slot, const std::string& b) {
  Writer w;
  w.u64(slot);
  w.bytes(b);
  return std::move(w.str());
}

std::pair<uint64_t, std::string> decode_slot_bytes(const std::string& body, size_t cap) {
  Reader rd(body, "message");
  uint64_t slot = rd.u64();
  return {slot, rd.bytes(cap)};
}

std::string encode_info(const EndpointInfo& info) {
  Writer w;
  w.u32(kInfoMagic);
  w.u16(kProtocolVersion);
  w.bytes(info.name);
  w.bytes(info.address);
  w.bytes(info.transport);
  w.u32(static_cast<uint32_t>(info.regions.size()));
  for (const auto& [id, nbytes] : info.regions) {
    w.u32(id);
    w.u64(nbytes);
  }
  return std::move(w.str());
}

EndpointInfo decode_info(const std::string& blob) {
  Reader rd(blob, "endpoint info");
  if (rd.u32() != kInfoMagic) {
    fail(ErrorCode::kInvalidRequest, "not a kvtransfer endpoint info blob (bad magic); pass "
                                     "ep.info() bytes or a 'host:port' string");
  }
  uint16_t version = rd.u16();
  if (version != kProtocolVersion) {
    fail(ErrorCode::kProtocol, "endpoint info of protocol version " + std::to_string(version) +
                                   "; this endpoint speaks version " +
                                   std::to_string(kProtocolVersion));
  }
  EndpointInfo info;
  info.name = rd.bytes(kMaxName);
  info.address = rd.bytes(kMaxAddress);
  info.transport = rd.bytes(kMaxName);
  uint32_t n = rd.u32();
  if (n > rd.remaining() / 12) fail(ErrorCode::kProtocol, "endpoint info: region count exceeds its size");
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t id = rd.u32();
    info.regions.emplace_back(id, rd.u64());
  }
  return info;
}

}  // namespace kvt::wire
