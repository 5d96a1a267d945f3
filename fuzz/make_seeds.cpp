// Writes the seed corpus of every harness (tests/fuzz_corpus/<harness>/): valid frames and
// messages made by the real encoders, plus the edge cases a hostile peer would try first
// (truncations, bad magic, future versions, unknown types, lengths and counts over the caps,
// corrupted checksums, trailing bytes). Run by fuzz/make_corpus.sh.
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "transport/cma/cma_arrival_ring.h"
#include "wire/control.h"
#include "wire/crc32c.h"
#include "wire/data_frame.h"
#include "wire/version.h"
#if __has_include("wire/ticket.h")
#include "wire/ticket.h"
#define HAVE_TICKET 1
#endif
#if __has_include("serialize/kv_file.h")
#include "serialize/kv_file.h"
#define HAVE_KV_FILE 1
#endif

using namespace kvt;
using namespace kvt::wire;

namespace {

std::string root;

void put(const std::string& harness, const std::string& name, const std::string& bytes) {
  std::string dir = root + "/" + harness;
  ::mkdir(dir.c_str(), 0755);
  std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

void le(std::string& s, size_t at, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) s[at + i] = static_cast<char>(v >> (8 * i));
}

std::string frame(MsgType t, const std::string& body) { return encode_control(t, body); }

std::vector<RemoteRegion> sample_regions() {
  RemoteRegion a;
  a.id = 1;
  a.key = 0x1122334455667788ull;
  a.nbytes = 1 << 20;
  a.base = 0x7f0000000000ull;
  a.remote_write = true;
  RemoteRegion b = a;
  b.id = 7;
  b.remote_read = true;
  b.rkey = std::string(16, 'k');
  return {a, b};
}

void control_seeds() {
  const std::string h = "control";
  auto hello = encode(Hello{kProtocolVersion, "prefill-0", std::string(16, 'N')});
  auto challenge = encode(Challenge{kProtocolVersion, "decode-0", std::string(16, 'M'), true,
                                    std::string(32, 'P')});
  Welcome w;
  w.token = 42;
  w.transport = "tcp";
  w.address = "127.0.0.1:5555";
  w.regions = sample_regions();
  auto welcome = encode(w);
  put(h, "hello", frame(MsgType::kHello, hello));
  put(h, "challenge", frame(MsgType::kChallenge, challenge));
  put(h, "auth", frame(MsgType::kAuth, encode_bytes(std::string(32, 'p'))));
  put(h, "auth_empty", frame(MsgType::kAuth, encode_bytes("")));
  put(h, "welcome", frame(MsgType::kWelcome, welcome));
  put(h, "error", frame(MsgType::kError, encode(ErrorMsg{5, "incompatible protocol version"})));
  put(h, "begin", frame(MsgType::kBegin, encode(Begin{9, 3, 5000, true, "req-42"})));
  put(h, "begin_no_notify", frame(MsgType::kBegin, encode(Begin{10, 1, 100, false, ""})));
  put(h, "ack", frame(MsgType::kAck, encode(Ack{9, 0, ""})));
  put(h, "ack_error", frame(MsgType::kAck, encode(Ack{9, 2, "peer refused"})));
  put(h, "abort", frame(MsgType::kAbort, encode_slot_bytes(9, "deadline passed")));
  put(h, "notify", frame(MsgType::kNotify, encode_slot_bytes(11, "req-7")));
  put(h, "regions_req", frame(MsgType::kRegionsReq, ""));
  put(h, "regions", frame(MsgType::kRegions, encode_regions(sample_regions())));
  put(h, "regions_empty", frame(MsgType::kRegions, encode_regions({})));
  // Edge cases.
  put(h, "empty", "");
  put(h, "short_header", frame(MsgType::kHello, hello).substr(0, 15));
  std::string s = frame(MsgType::kHello, hello);
  le(s, 0, 0x50545448, 4);  // "HTTP"
  put(h, "bad_magic", s);
  s = frame(MsgType::kHello, hello);
  le(s, 4, kProtocolVersion + 1, 2);
  put(h, "future_version", s);
  s = frame(MsgType::kHello, hello);
  le(s, 6, 0, 2);
  put(h, "type_zero", s);
  le(s, 6, 12, 2);
  put(h, "type_unknown", s);
  s = frame(MsgType::kRegions, "");
  le(s, 8, kMaxControlBody + 1, 4);
  put(h, "length_over_cap", s);
  le(s, 8, kMaxControlBody, 4);
  put(h, "length_at_cap_short", s);
  s = frame(MsgType::kWelcome, welcome);
  s[s.size() - 1] ^= 1;
  put(h, "bad_crc", s);
  put(h, "truncated_body", frame(MsgType::kWelcome, welcome).substr(0, 40));
  put(h, "hello_trailing", frame(MsgType::kHello, hello + "future-field"));
  std::string big;
  le(big.append(4, '\0'), 0, 0xFFFFFFFFu, 4);
  put(h, "regions_count_huge", frame(MsgType::kRegions, big));
  put(h, "bytes_over_cap", frame(MsgType::kAuth, big));
  put(h, "begin_notify_over_cap",
      frame(MsgType::kBegin, encode(Begin{1, 1, 1, true, std::string(kMaxNotify + 1, 'x')})));
  put(h, "hello_truncated", frame(MsgType::kHello, hello.substr(0, hello.size() - 3)));
}

void data_seeds() {
  const std::string h = "data_frame";
  auto make = [](DataType t, uint64_t slot, std::vector<DataDesc> descs, uint64_t payload) {
    DataHeader hd;
    hd.type = t;
    hd.nseg = static_cast<uint32_t>(descs.size());
    hd.region = 3;
    hd.frame = 1;
    hd.slot = slot;
    hd.key = 0xABCDEF0123456789ull;
    hd.payload = payload;
    std::string out(kDataHeaderSize + descs.size() * kDataDescSize, '\0');
    auto* p = reinterpret_cast<uint8_t*>(out.data());
    encode_data_header(hd, descs.data(), p);
    encode_descs(descs.data(), hd.nseg, p + kDataHeaderSize);
    return out;
  };
  std::vector<DataDesc> three{{0, 4096}, {8192, 4096}, {65536, 100}};
  put(h, "hello", make(DataType::kHello, 0x1234, {}, 0));
  put(h, "write", make(DataType::kWrite, 5, three, 8292) + std::string(64, 'x'));
  put(h, "read_req", make(DataType::kReadReq, 6, three, 0));
  put(h, "read_resp", make(DataType::kReadResp, 6, {}, 8292));
  put(h, "read_err", make(DataType::kReadErr, 6, {}, 12) + "no such area");
  put(h, "begin", make(DataType::kBegin, 7, {}, 29) + std::string(33, 'b'));
  std::vector<DataDesc> many(kMaxDescsPerFrame, DataDesc{0, 1});
  put(h, "write_max_descs", make(DataType::kWrite, 7, many, kMaxDescsPerFrame));
  // Edge cases.
  put(h, "empty", "");
  put(h, "short_header", make(DataType::kHello, 1, {}, 0).substr(0, 47));
  std::string s = make(DataType::kWrite, 5, three, 8292);
  le(s, 0, 0x4354564B, 4);  // a control magic on a data connection
  put(h, "bad_magic", s);
  s = make(DataType::kWrite, 5, three, 8292);
  le(s, 4, kProtocolVersion + 1, 2);
  put(h, "future_version", s);
  s = make(DataType::kWrite, 5, three, 8292);
  s[6] = 0;
  put(h, "type_zero", s);
  s[6] = 6;
  put(h, "type_unknown", s);
  s = make(DataType::kWrite, 5, three, 8292);
  le(s, 8, kMaxDescsPerFrame + 1, 4);
  put(h, "nseg_over_cap", s);
  le(s, 8, 0xFFFFFFFFu, 4);
  put(h, "nseg_huge", s);
  s = make(DataType::kWrite, 5, three, 8292);
  s[kDataHeaderSize + 3] ^= 0x10;  // a descriptor offset changed in flight
  put(h, "desc_corrupted", s);
  s = make(DataType::kWrite, 5, three, 8292);
  s[7] = 1;  // flags: payload crc32c follows
  put(h, "flags_payload_crc", s);
  put(h, "descs_truncated", make(DataType::kWrite, 5, three, 8292).substr(0, kDataHeaderSize + 20));
  put(h, "desc_overflow", make(DataType::kWrite, 5, {{~0ull - 10, 100}}, 100));
}

void info_seeds() {
  const std::string h = "endpoint_info";
  EndpointInfo info{"decode-0", "127.0.0.1:40000", "tcp", {{1, 1 << 20}, {2, 4096}, {9, 0}}};
  std::string good = encode_info(info);
  put(h, "info", good);
  put(h, "info_no_regions", encode_info(EndpointInfo{"p", "[::1]:1", "fabric", {}}));
  put(h, "empty", "");
  put(h, "magic_only", good.substr(0, 4));
  put(h, "host_port_string", "127.0.0.1:5555");
  std::string s = good;
  le(s, 4, kProtocolVersion + 1, 2);
  put(h, "future_version", s);
  put(h, "trailing", good + "appended-field");
  put(h, "truncated", good.substr(0, good.size() - 5));
  s = encode_info(EndpointInfo{"p", "a:1", "tcp", {}});
  le(s, s.size() - 4, 0xFFFFFFFFu, 4);
  put(h, "region_count_huge", s);
  s = good;
  le(s, 6, 0xFFFFFFFFu, 4);
  put(h, "name_len_huge", s);
}

void handshake_seeds() {
  const std::string h = "handshake";
  auto hello = frame(MsgType::kHello, encode(Hello{kProtocolVersion, "raw", std::string(16, 'N')}));
  auto auth = frame(MsgType::kAuth, encode_bytes(""));
  auto auth_proof = frame(MsgType::kAuth, encode_bytes(std::string(32, 'x')));
  auto loop = frame(MsgType::kBegin, encode(Begin{1, 2, 5000, true, "req-1"})) +
              frame(MsgType::kAck, encode(Ack{1, 0, ""})) +
              frame(MsgType::kNotify, encode_slot_bytes(2, "req-2")) +
              frame(MsgType::kAbort, encode_slot_bytes(1, "deadline passed")) +
              frame(MsgType::kRegionsReq, "") +
              frame(MsgType::kRegions, encode_regions(sample_regions())) +
              frame(MsgType::kError, encode(ErrorMsg{2, "bye"}));
  Welcome w;
  w.token = 7;
  w.transport = "tcp";
  w.address = "127.0.0.1:1";
  w.regions = sample_regions();
  auto challenge = frame(MsgType::kChallenge, encode(Challenge{kProtocolVersion, "srv",
                                                               std::string(16, 'M'), false, ""}));
  auto challenge_auth = frame(MsgType::kChallenge, encode(Challenge{kProtocolVersion, "srv",
                                                                    std::string(16, 'M'), true,
                                                                    std::string(32, 'P')}));
  auto welcome = frame(MsgType::kWelcome, encode(w));
  // Mode byte: bit 0 client, bit 1 fix crcs, bit 2 auth token set.
  put(h, "server", std::string(1, '\0') + hello + auth + loop);
  put(h, "server_fixcrc", std::string(1, '\2') + hello + auth + loop);
  put(h, "server_token", std::string(1, '\4') + hello + auth_proof + loop);
  put(h, "server_first_not_hello", std::string(1, '\0') + auth + hello);
  put(h, "server_error_for_auth",
      std::string(1, '\0') + hello + frame(MsgType::kError, encode(ErrorMsg{4, "no"})));
  std::string v2 = hello;
  le(v2, 4, kProtocolVersion + 1, 2);
  put(h, "server_future_header_version", std::string(1, '\2') + v2);
  put(h, "server_future_hello_version",
      std::string(1, '\0') +
          frame(MsgType::kHello, encode(Hello{kProtocolVersion + 1, "new", std::string(16, 'N')})));
  put(h, "server_hello_after_handshake", std::string(1, '\0') + hello + auth + hello);
  put(h, "client", std::string(1, '\1') + challenge + welcome + loop);
  put(h, "client_fixcrc", std::string(1, '\3') + challenge + welcome + loop);
  put(h, "client_token", std::string(1, '\5') + challenge_auth + welcome + loop);
  put(h, "client_refused",
      std::string(1, '\1') + frame(MsgType::kError, encode(ErrorMsg{5, "version"})));
  put(h, "empty", std::string(1, '\0'));
  std::string huge = frame(MsgType::kRegions, "");
  le(huge, 8, kMaxControlBody, 4);
  put(h, "client_body_at_cap", std::string(1, '\1') + huge);
}

#ifdef HAVE_TICKET
void ticket_seeds() {
  // First byte: 0 = a ticket, 1 = a KV note.
  const std::string h = "ticket";
  Ticket t;
  t.kind = TicketKind::kExpect;
  t.request_id = "req-42";
  t.endpoint_info = encode_info(EndpointInfo{"decode-0", "127.0.0.1:4000", "tcp", {{1, 4096}}});
  t.tp_rank = 1;
  t.tp_size = 2;
  t.fingerprint = std::string(64, 'f');
  t.descriptor = "{\"layout\":{},\"buffers\":[4096],\"planes\":[0,0]}";
  t.regions = {1, 2};
  t.blocks = {7, 3, 9, -1};
  t.timeout_ms = 5000;
  std::string good = encode_ticket(t);
  put(h, "expect", std::string(1, '\0') + good);
  Ticket offer = t;
  offer.kind = TicketKind::kOffer;
  offer.regions.clear();
  offer.blocks.clear();
  put(h, "offer_empty_lists", std::string(1, '\0') + encode_ticket(offer));
  std::string s = good;
  le(s, 4, kProtocolVersion + 1, 2);
  put(h, "future_version", std::string(1, '\0') + s);
  s = good;
  s[6] = 3;
  put(h, "unknown_kind", std::string(1, '\0') + s);
  s = good;
  s[s.size() - 1] ^= 1;
  put(h, "bad_crc", std::string(1, '\0') + s);
  put(h, "truncated", std::string(1, '\0') + good.substr(0, 9));
  Ticket bad_rank = t;
  bad_rank.tp_rank = 2;
  put(h, "rank_out_of_range", std::string(1, '\0') + encode_ticket(bad_rank));
  KvNote n;
  n.request_id = "req-42";
  n.src_rank = 0;
  n.n_sources = 2;
  n.layer_begin = 0;
  n.layer_end = 32;
  n.group = 1;
  n.n_groups = 3;
  put(h, "note_layers", std::string(1, '\1') + encode_note(n));
  n.kind = NoteKind::kPulled;
  put(h, "note_pulled", std::string(1, '\1') + encode_note(n));
  put(h, "note_prefix_only", std::string(1, '\1') + note_prefix("req-42"));
  put(h, "note_not_a_note", std::string(1, '\1') + "plain user payload");
}
#endif

#ifdef HAVE_KV_FILE
void kv_file_seeds() {
  const std::string h = "kv_file";
  using namespace kvt::serialize;
  KvFileHeader hd;
  hd.dtype = "float16";
  hd.itemsize = 2;
  hd.num_layers = 2;
  hd.kv_parts = 2;
  hd.block_size = 2;
  hd.num_kv_heads = 2;
  hd.head_dim = 4;
  hd.block_bytes = 2ull * 2 * 2 * 2 * 4 * 2;
  hd.num_blocks = 3;
  hd.fingerprint = std::string(64, 'f');
  hd.layout = "{\"dims\":\"KBTHD\",\"format\":1}";
  auto file = [](const KvFileHeader& hd) {
    std::string out = encode_kv_header(hd);
    for (uint64_t i = 0; i < hd.num_blocks; ++i) {
      std::string rec(kv_record_bytes(hd), '\0');
      for (size_t k = kKvRecordHeaderSize; k + kKvRecordTrailerSize < rec.size(); ++k) {
        rec[k] = static_cast<char>(i * 31 + k);
      }
      seal_kv_record(reinterpret_cast<uint8_t*>(rec.data()), rec.size(), static_cast<uint32_t>(i),
                     10 + i);
      out += rec;
    }
    return out;
  };
  std::string good = file(hd);
  put(h, "three_blocks", good);
  KvFileHeader sc = hd;
  sc.flags = kKvFlagScales;
  sc.scale_count = 2;
  put(h, "with_scales", file(sc));
  KvFileHeader mla = hd;
  mla.kv_parts = 1;
  mla.num_kv_heads = 1;
  mla.dtype = "bfloat16";
  mla.block_bytes = 2ull * 1 * 2 * 1 * 4 * 2;
  mla.num_blocks = 1;
  put(h, "mla_one_block", file(mla));
  KvFileHeader none = hd;
  none.num_blocks = 0;
  put(h, "no_blocks", file(none));
  // Edge cases.
  put(h, "empty", "");
  put(h, "preamble_only", good.substr(0, kKvPreambleSize));
  std::string s = good;
  le(s, 4, kKvFileVersion + 1, 2);
  put(h, "future_version", s);
  s = good;
  le(s, 8, 0xFFFFFFFFu, 4);
  put(h, "header_len_huge", s);
  s = good;
  s[20] ^= 1;  // a geometry byte: the header crc catches it
  put(h, "header_corrupted", s);
  size_t hlen = encode_kv_header(hd).size();
  s = good;
  s[hlen + kKvRecordHeaderSize + 5] ^= 0x40;  // one data bit of block 0
  put(h, "record_bit_flip", s);
  put(h, "truncated_record", good.substr(0, good.size() - 7));
  KvFileHeader big = hd;
  big.num_layers = 0xFFFFFFFFu;  // block size overflows the cap
  put(h, "geometry_overflow", encode_kv_header(big));
  KvFileHeader wrong = hd;
  wrong.block_bytes += 1;  // does not match the geometry
  put(h, "block_bytes_mismatch", encode_kv_header(wrong));
  KvFileHeader flags = hd;
  flags.flags = 0x80;  // a flag from the future
  put(h, "unknown_flags", encode_kv_header(flags));
  put(h, "header_trailing_field", [&] {
    // A newer minor version's appended field: length and crc cover it, readers skip it.
    std::string x = encode_kv_header(hd);
    x.resize(x.size() - 4);
    x += "NEWFIELD";
    le(x, 8, x.size() + 4, 4);
    uint32_t crc = kvt::wire::crc32c(x.data(), x.size());
    x.append(4, '\0');
    le(x, x.size() - 4, crc, 4);
    return x;
  }());
}
#endif

void arrival_ring_seeds() {
  // The ring's memory as an initiator leaves it (ArrivalRing::push).
  const std::string h = "arrival_ring";
  auto image = [](int records, const std::string& text) {
    alignas(64) static char mem[kvt::cma::ArrivalRing::bytes()];
    std::memset(mem, 0, sizeof mem);
    kvt::cma::ArrivalRing ring(mem);
    for (int i = 0; i < records; ++i) ring.push(100 + i, 1, i % 2 ? text : "");
    return std::string(mem, sizeof mem);
  };
  put(h, "empty", image(0, ""));
  put(h, "two_records_one_with_begin", image(2, std::string(60, 'b')));
  put(h, "full", image(static_cast<int>(kvt::cma::kRingSlots), "x"));
  std::string beyond = image(1, "");
  beyond[0] = '\x7f';  // tail far beyond the ring
  put(h, "tail_beyond_the_ring", beyond);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_ROOT\n", argv[0]);
    return 2;
  }
  root = argv[1];
  ::mkdir(root.c_str(), 0755);
  control_seeds();
  data_seeds();
  info_seeds();
  handshake_seeds();
  arrival_ring_seeds();
#ifdef HAVE_KV_FILE
  kv_file_seeds();
#endif
#ifdef HAVE_TICKET
  ticket_seeds();
#endif
  return 0;
}
