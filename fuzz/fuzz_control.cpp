// Control frames: the 16-byte header (magic, version, type, length, crc32c), the body's crc
// check, then the body decoder of the header's type -- run whatever the crc says, so bodies
// are explored without the fuzzer having to forge checksums. Every body that decodes must
// re-encode to bytes that decode to the same message.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "wire/control.h"
#include "wire/version.h"

using namespace kvt::wire;

namespace {

bool same(const std::vector<kvt::RemoteRegion>& a, const std::vector<kvt::RemoteRegion>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto &x = a[i], &y = b[i];
    if (x.id != y.id || x.key != y.key || x.nbytes != y.nbytes || x.base != y.base ||
        x.remote_write != y.remote_write || x.remote_read != y.remote_read || x.rkey != y.rkey) {
      return false;
    }
  }
  return true;
}

void body(MsgType type, const std::string& b) {
  switch (type) {
    case MsgType::kHello: {
      Hello m;
      if (fuzz::decodes([&] { m = decode_hello(b); })) {
        Hello r = decode_hello(encode(m));
        FUZZ_CHECK(r.version == m.version && r.name == m.name && r.nonce == m.nonce);
      }
      break;
    }
    case MsgType::kChallenge: {
      Challenge m;
      if (fuzz::decodes([&] { m = decode_challenge(b); })) {
        Challenge r = decode_challenge(encode(m));
        FUZZ_CHECK(r.version == m.version && r.name == m.name && r.nonce == m.nonce &&
                   r.auth_required == m.auth_required && r.proof == m.proof);
      }
      break;
    }
    case MsgType::kWelcome: {
      Welcome m;
      if (fuzz::decodes([&] { m = decode_welcome(b); })) {
        Welcome r = decode_welcome(encode(m));
        FUZZ_CHECK(r.token == m.token && r.transport == m.transport && r.address == m.address &&
                   same(r.regions, m.regions));
      }
      break;
    }
    case MsgType::kError: {
      ErrorMsg m;
      if (fuzz::decodes([&] { m = decode_error(b); })) {
        ErrorMsg r = decode_error(encode(m));
        FUZZ_CHECK(r.code == m.code && r.message == m.message);
      }
      break;
    }
    case MsgType::kBegin: {
      Begin m;
      if (fuzz::decodes([&] { m = decode_begin(b); })) {
        FUZZ_CHECK(m.notify.size() <= kMaxNotify);
        Begin r = decode_begin(encode(m));
        FUZZ_CHECK(r.slot == m.slot && r.units == m.units && r.deadline_ms == m.deadline_ms &&
                   r.has_notify == m.has_notify && r.notify == m.notify);
      }
      break;
    }
    case MsgType::kAck: {
      Ack m;
      if (fuzz::decodes([&] { m = decode_ack(b); })) {
        Ack r = decode_ack(encode(m));
        FUZZ_CHECK(r.slot == m.slot && r.code == m.code && r.message == m.message);
      }
      break;
    }
    case MsgType::kAuth: {
      std::string proof;
      if (fuzz::decodes([&] { proof = decode_bytes(b, 64); })) {
        FUZZ_CHECK(proof.size() <= 64 && decode_bytes(encode_bytes(proof), 64) == proof);
      }
      break;
    }
    case MsgType::kAbort:
    case MsgType::kNotify: {
      std::pair<uint64_t, std::string> m;
      if (fuzz::decodes([&] { m = decode_slot_bytes(b, kMaxNotify); })) {
        FUZZ_CHECK(m.second.size() <= kMaxNotify);
        FUZZ_CHECK(decode_slot_bytes(encode_slot_bytes(m.first, m.second), kMaxNotify) == m);
      }
      break;
    }
    case MsgType::kRegionsReq:
      break;  // no body
    case MsgType::kRegions: {
      std::vector<kvt::RemoteRegion> m;
      if (fuzz::decodes([&] { m = decode_regions(b); })) {
        FUZZ_CHECK(same(decode_regions(encode_regions(m)), m));
      }
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kControlHeaderSize) return 0;
  ControlHeader h{};
  if (!fuzz::decodes([&] { h = decode_control_header(data); })) return 0;
  FUZZ_CHECK(h.length <= kMaxControlBody);
  // The body is what follows the header, cut at the announced length (a short input stands for
  // a stream that ends early, which the socket layer reports; the decoders see what arrived).
  size_t n = std::min<size_t>(h.length, size - kControlHeaderSize);
  std::string b(reinterpret_cast<const char*>(data + kControlHeaderSize), n);
  bool crc_ok = fuzz::decodes([&] { verify_control_body(h, b); });
  if (crc_ok) {
    // A frame that verifies re-frames to the same bytes.
    std::string again = encode_control(h.type, b);
    if (h.version == kProtocolVersion && n == h.length) {
      FUZZ_CHECK(again.compare(0, again.size(), reinterpret_cast<const char*>(data),
                               kControlHeaderSize + n) == 0);
    }
  }
  body(h.type, b);
  return 0;
}
