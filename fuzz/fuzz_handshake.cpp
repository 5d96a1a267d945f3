// The handshake and control-loop decode path, as a hostile peer drives it: the input is the
// byte stream the peer sends, read through the real framing code (ControlChannel::recv over a
// socketpair: header decode, length cap, body read, crc check) and decoded in the order
// csrc/engine/endpoint.cpp does (handshake_as_server / handshake_as_client, then handle()).
// The sequence of decode calls mirrors endpoint.cpp; keep them in step.
//
// First input byte: bit 0 = play the client (else the server), bit 1 = fix up each frame's
// crc32c before sending (so the fuzzer reaches the later messages), bit 2 = an auth token is set.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "auth/hmac_sha256.h"
#include "common.h"
#include "engine/control_channel.h"
#include "net/socket.h"
#include "wire/control.h"
#include "wire/crc32c.h"
#include "wire/version.h"

using namespace kvt;
using wire::MsgType;

namespace {

const std::string kToken = "fuzz-token";
const std::string kOurNonce(16, 'n');

void expect_type(const ControlMessage& m, MsgType type) {
  if (m.type == MsgType::kError) {
    auto e = wire::decode_error(m.body);
    fail(ErrorCode::kProtocol, "peer refused: " + e.message);
  }
  if (m.type != type) fail(ErrorCode::kProtocol, "unexpected message type during the handshake");
}

void as_server(ControlChannel& ch, bool token) {
  ControlMessage hello_msg = ch.recv();
  if (hello_msg.type != MsgType::kHello) fail(ErrorCode::kProtocol, "did not start with HELLO");
  if (hello_msg.version != wire::kProtocolVersion) fail(ErrorCode::kProtocol, "version");
  wire::Hello hello = wire::decode_hello(hello_msg.body);
  if (hello.version != wire::kProtocolVersion) fail(ErrorCode::kProtocol, "version");
  wire::Challenge challenge{wire::kProtocolVersion, "fuzz", kOurNonce, token, ""};
  if (token) challenge.proof = auth::hmac_sha256(kToken, "kvtransfer-server" + hello.nonce + kOurNonce);
  ch.send(MsgType::kChallenge, wire::encode(challenge));
  ControlMessage auth_msg = ch.recv();
  expect_type(auth_msg, MsgType::kAuth);
  std::string proof = wire::decode_bytes(auth_msg.body, 64);
  if (token && !auth::constant_time_equal(
                   proof, auth::hmac_sha256(kToken, "kvtransfer-client" + kOurNonce + hello.nonce))) {
    fail(ErrorCode::kAuthentication, "wrong auth_token");
  }
}

void as_client(ControlChannel& ch, bool token) {
  ControlMessage m = ch.recv();
  expect_type(m, MsgType::kChallenge);
  wire::Challenge c = wire::decode_challenge(m.body);
  if (c.version != wire::kProtocolVersion) fail(ErrorCode::kProtocol, "version");
  if (c.auth_required != token) fail(ErrorCode::kAuthentication, "auth mismatch");
  ch.send(MsgType::kAuth, wire::encode_bytes(""));
  if (token && !auth::constant_time_equal(
                   c.proof, auth::hmac_sha256(kToken, "kvtransfer-server" + kOurNonce + c.nonce))) {
    fail(ErrorCode::kAuthentication, "server proof");
  }
  ControlMessage w = ch.recv();
  expect_type(w, MsgType::kWelcome);
  wire::Welcome welcome = wire::decode_welcome(w.body);
  std::map<uint32_t, RemoteRegion> regions;
  for (auto& r : welcome.regions) regions[r.id] = r;
}

// Endpoint::handle, minus the side effects.
void control_loop(ControlChannel& ch) {
  std::map<uint32_t, RemoteRegion> regions;
  for (;;) {
    ControlMessage m = ch.recv();
    if (m.version != wire::kProtocolVersion) fail(ErrorCode::kProtocol, "version");
    switch (m.type) {
      case MsgType::kBegin: {
        wire::Begin b = wire::decode_begin(m.body);
        FUZZ_CHECK(b.notify.size() <= wire::kMaxNotify);
        break;
      }
      case MsgType::kAck:
        (void)wire::decode_ack(m.body);
        break;
      case MsgType::kAbort:
        (void)wire::decode_slot_bytes(m.body, 4096);
        break;
      case MsgType::kNotify: {
        auto [slot, payload] = wire::decode_slot_bytes(m.body, wire::kMaxNotify);
        ch.send(MsgType::kAck, wire::encode(wire::Ack{slot, 0, ""}));
        break;
      }
      case MsgType::kRegionsReq:
        break;
      case MsgType::kRegions:
        regions.clear();
        for (auto& r : wire::decode_regions(m.body)) regions[r.id] = r;
        break;
      case MsgType::kError: {
        auto e = wire::decode_error(m.body);
        fail(ErrorCode::kProtocol, "peer refused: " + e.message);
      }
      default:
        fail(ErrorCode::kProtocol, "handshake message after the handshake");
    }
  }
}

// Rewrites each frame's crc field to match the bytes that follow it (as far as they go).
void fix_crcs(std::vector<uint8_t>& s) {
  size_t at = 0;
  while (s.size() - at >= wire::kControlHeaderSize) {
    uint8_t* h = s.data() + at;
    size_t len = std::min<size_t>(fuzz::le32(h + 8), s.size() - at - wire::kControlHeaderSize);
    fuzz::put_le32(h + 12, 0);  // the crc covers the header with its crc field zero, then the body
    fuzz::put_le32(h + 12, wire::crc32c(h + wire::kControlHeaderSize, len,
                                        wire::crc32c(h, wire::kControlHeaderSize)));
    at += wire::kControlHeaderSize + len;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 || size > 64 * 1024) return 0;  // fits a socketpair's buffer: no writer thread
  const uint8_t mode = data[0];
  std::vector<uint8_t> stream(data + 1, data + size);
  if (mode & 2) fix_crcs(stream);
  int sv[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  net::Socket peer(sv[1]);
  if (!stream.empty()) peer.send_all(stream.data(), stream.size(), "fuzz peer");
  ::shutdown(sv[1], SHUT_WR);  // then EOF: the stream ends where the input does
  ControlChannel ch(net::Socket(sv[0]), "fuzz control connection");
  ch.set_timeouts(1.0, 1.0);  // nothing here may block: a hang would be a finding
  try {
    if (mode & 1) {
      as_client(ch, mode & 4);
    } else {
      as_server(ch, mode & 4);
    }
    control_loop(ch);
  } catch (const Error& e) {
    // Every way out is a kvt::Error: the stream's end (Transport), a malformed or refused
    // message (Protocol), a wrong proof (Authentication).
    FUZZ_CHECK(e.code() == ErrorCode::kTransport || e.code() == ErrorCode::kProtocol ||
               e.code() == ErrorCode::kAuthentication);
  }
  return 0;
}
