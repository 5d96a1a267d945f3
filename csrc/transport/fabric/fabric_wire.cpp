#include "transport/fabric/fabric_wire.h"

#include "core/error.h"
#include "wire/codec.h"

namespace kvt::fabric {
namespace {

constexpr uint32_t kAddrMagic = 0x4146564b;  // "KVFA"
constexpr uint32_t kMsgMagic = 0x4d46564b;   // "KVFM"
constexpr uint8_t kVersion = 1;
constexpr size_t kMaxRails = 64;

}  // namespace

std::string encode_address(const FabricAddress& a) {
  wire::Writer w;
  w.u32(kAddrMagic);
  w.u8(kVersion);
  w.bytes(a.provider);
  w.u8(static_cast<uint8_t>(a.rails.size()));
  for (const auto& r : a.rails) {
    w.bytes(r.domain);
    w.bytes(r.raw);
  }
  return w.str();
}

FabricAddress decode_address(const std::string& bytes) {
  wire::Reader r(bytes, "fabric address");
  if (r.u32() != kAddrMagic) fail(ErrorCode::kProtocol, "peer's transport address is not a fabric address");
  if (r.u8() != kVersion) fail(ErrorCode::kProtocol, "peer's fabric address has an unknown version");
  FabricAddress a;
  a.provider = r.bytes(256);
  size_t n = r.u8();
  if (n == 0 || n > kMaxRails) fail(ErrorCode::kProtocol, "peer's fabric address lists " + std::to_string(n) + " rails");
  for (size_t i = 0; i < n; ++i) {
    RailAddress ra;
    ra.domain = r.bytes(256);
    ra.raw = r.bytes(1024);
    a.rails.push_back(std::move(ra));
  }
  r.expect_end();
  return a;
}

std::string encode_rkey(const std::vector<RailKey>& keys) {
  wire::Writer w;
  for (const auto& k : keys) {
    w.u64(k.key);
    w.u64(k.base);
  }
  return w.str();
}

std::vector<RailKey> decode_rkey(const std::string& bytes) {
  if (bytes.size() % 16 != 0 || bytes.size() / 16 > kMaxRails) {
    fail(ErrorCode::kProtocol, "peer's fabric remote key has " + std::to_string(bytes.size()) +
                                   " bytes, not 16 per rail");
  }
  wire::Reader r(bytes, "fabric remote key");
  std::vector<RailKey> keys(bytes.size() / 16);
  for (auto& k : keys) {
    k.key = r.u64();
    k.base = r.u64();
  }
  r.expect_end();
  return keys;
}

std::string encode_msg(const Msg& m) {
  wire::Writer w;
  w.u32(kMsgMagic);
  w.u8(kVersion);
  w.u8(static_cast<uint8_t>(m.type));
  switch (m.type) {
    case MsgType::kHello:
      w.u64(m.token);
      w.bytes(m.reply_to);
      break;
    case MsgType::kHelloAck:
      w.u64(m.token);
      w.u32(m.tag);
      w.bytes(m.reply_to);
      break;
    case MsgType::kMap:
      w.u32(m.tag);
      w.u32(m.seq);
      w.u32(m.units);
      w.u64(m.slot);
      w.u32(m.region);
      w.u64(m.key);
      break;
    case MsgType::kReadBegin:
      w.u32(m.tag);
      w.u32(m.seq);
      w.u32(m.region);
      w.u64(m.key);
      break;
    case MsgType::kRelease:
      w.u32(m.tag);
      w.u32(m.seq);
      break;
    case MsgType::kRetire:
    case MsgType::kRetired:
      w.u64(m.token);
      w.u32(m.region);
      break;
  }
  return w.str();
}

Msg decode_msg(const void* data, size_t len) {
  wire::Reader r(data, len, "fabric message");
  if (r.u32() != kMsgMagic) fail(ErrorCode::kProtocol, "fabric message with a bad magic number");
  if (r.u8() != kVersion) fail(ErrorCode::kProtocol, "fabric message of an unknown version");
  Msg m;
  m.type = static_cast<MsgType>(r.u8());
  switch (m.type) {
    case MsgType::kHello:
      m.token = r.u64();
      m.reply_to = r.bytes(kMaxMsgBytes);
      break;
    case MsgType::kHelloAck:
      m.token = r.u64();
      m.tag = r.u32();
      m.reply_to = r.bytes(kMaxMsgBytes);
      break;
    case MsgType::kMap:
      m.tag = r.u32();
      m.seq = r.u32();
      m.units = r.u32();
      m.slot = r.u64();
      m.region = r.u32();
      m.key = r.u64();
      break;
    case MsgType::kReadBegin:
      m.tag = r.u32();
      m.seq = r.u32();
      m.region = r.u32();
      m.key = r.u64();
      break;
    case MsgType::kRelease:
      m.tag = r.u32();
      m.seq = r.u32();
      break;
    case MsgType::kRetire:
    case MsgType::kRetired:
      m.token = r.u64();
      m.region = r.u32();
      break;
    default:
      fail(ErrorCode::kProtocol, "fabric message of unknown type " + std::to_string(static_cast<int>(m.type)));
  }
  r.expect_end();
  return m;
}

}  // namespace kvt::fabric
