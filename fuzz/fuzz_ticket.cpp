// Tickets (KVReceiver.expect / offers: magic, version, kind, request id, endpoint info, TP rank,
// layout fingerprint, cache descriptor, regions, blocks, timeout, crc32c) and the KV
// notification payloads (notes) that ride on transfers. The first input byte picks the
// decoder; a ticket is decoded as sent and, so the fuzzer gets past the checksum, once more with
// its crc32c fixed up. Whatever decodes must re-encode to the same fields.
#include <cstddef>
#include <cstdint>
#include <string>

#include "common.h"
#include "wire/crc32c.h"
#include "wire/ticket.h"

using namespace kvt::wire;

namespace {

void ticket(std::string bytes) {
  Ticket t;
  if (!fuzz::decodes([&] { t = decode_ticket(bytes); })) return;
  FUZZ_CHECK(t.tp_rank < t.tp_size && t.regions.size() <= bytes.size() / 4 &&
             t.blocks.size() <= bytes.size() / 8);
  Ticket r = decode_ticket(encode_ticket(t));
  FUZZ_CHECK(r.kind == t.kind && r.request_id == t.request_id &&
             r.endpoint_info == t.endpoint_info && r.tp_rank == t.tp_rank &&
             r.tp_size == t.tp_size && r.fingerprint == t.fingerprint &&
             r.descriptor == t.descriptor && r.regions == t.regions && r.blocks == t.blocks &&
             r.timeout_ms == t.timeout_ms);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] & 1) {
    KvNote n;
    if (decode_note(bytes, &n)) {
      FUZZ_CHECK(n.group < n.n_groups && n.layer_begin <= n.layer_end);
      KvNote r;
      FUZZ_CHECK(decode_note(encode_note(n), &r));
      FUZZ_CHECK(r.kind == n.kind && r.request_id == n.request_id && r.src_rank == n.src_rank &&
                 r.n_sources == n.n_sources && r.layer_begin == n.layer_begin &&
                 r.layer_end == n.layer_end && r.group == n.group && r.n_groups == n.n_groups);
      FUZZ_CHECK(encode_note(n).compare(0, note_prefix(n.request_id).size(),
                                        note_prefix(n.request_id)) == 0);
    }
    return 0;
  }
  ticket(bytes);
  if (bytes.size() >= 4) {  // the same bytes with a valid crc32c
    uint32_t crc = crc32c(bytes.data(), bytes.size() - 4);
    for (int i = 0; i < 4; ++i) bytes[bytes.size() - 4 + i] = static_cast<char>(crc >> (8 * i));
    ticket(bytes);
  }
  return 0;
}
