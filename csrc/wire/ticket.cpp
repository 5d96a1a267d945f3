#include "wire/ticket.h"

#include "core/error.h"
#include "wire/codec.h"
#include "wire/crc32c.h"
#include "wire/version.h"

namespace kvt::wire {
namespace {

constexpr uint32_t kTicketMagic = 0x4B54564B;  // "KVTK"
constexpr size_t kMaxField = 1 << 20;
constexpr uint32_t kMaxBlocks = 1 << 24;
constexpr uint32_t kMaxRegions = 1 << 16;
constexpr uint32_t kNoteMagic = 0x4E54564B;  // "KVTN"

}  // namespace

// magic u32 | version u16 | kind u8 | request_id | endpoint_info | tp_rank u32 | tp_size u32 |
// fingerprint | descriptor | n_regions u32, u32 each | n_blocks u32, i64 each | timeout_ms u32 |
// crc32c u32 of everything before it. Byte strings are u32 length + bytes.
std::string encode_ticket(const Ticket& t) {
  Writer w;
  w.u32(kTicketMagic);
  w.u16(kProtocolVersion);
  w.u8(static_cast<uint8_t>(t.kind));
  w.bytes(t.request_id);
  w.bytes(t.endpoint_info);
  w.u32(t.tp_rank);
  w.u32(t.tp_size);
  w.bytes(t.fingerprint);
  w.bytes(t.descriptor);
  w.u32(static_cast<uint32_t>(t.regions.size()));
  for (uint32_t r : t.regions) w.u32(r);
  w.u32(static_cast<uint32_t>(t.blocks.size()));
  for (int64_t b : t.blocks) w.u64(static_cast<uint64_t>(b));
  w.u32(t.timeout_ms);
  w.u32(crc32c(w.str().data(), w.size()));
  return std::move(w.str());
}

Ticket decode_ticket(const std::string& bytes) {
  if (bytes.size() < 10) fail(ErrorCode::kProtocol, "ticket: truncated (" + std::to_string(bytes.size()) + " bytes)");
  Reader crc_rd(bytes.data() + bytes.size() - 4, 4, "ticket");
  if (crc_rd.u32() != crc32c(bytes.data(), bytes.size() - 4)) {
    fail(ErrorCode::kProtocol, "ticket fails its crc32c (corrupted or not a ticket)");
  }
  Reader rd(bytes.data(), bytes.size() - 4, "ticket");
  if (rd.u32() != kTicketMagic) fail(ErrorCode::kProtocol, "not a kvtransfer ticket (bad magic)");
  uint16_t version = rd.u16();
  if (version != kProtocolVersion) {
    fail(ErrorCode::kProtocol, "ticket of protocol version " + std::to_string(version) +
                                   "; this side speaks version " + std::to_string(kProtocolVersion));
  }
  Ticket t;
  uint8_t kind = rd.u8();
  if (kind != 1 && kind != 2) fail(ErrorCode::kProtocol, "ticket of unknown kind " + std::to_string(kind));
  t.kind = static_cast<TicketKind>(kind);
  t.request_id = rd.bytes(kMaxField);
  t.endpoint_info = rd.bytes(kMaxField);
  t.tp_rank = rd.u32();
  t.tp_size = rd.u32();
  t.fingerprint = rd.bytes(kMaxField);
  t.descriptor = rd.bytes(kMaxField);
  uint32_t nr = rd.u32();
  if (nr > kMaxRegions || nr > rd.remaining() / 4) fail(ErrorCode::kProtocol, "ticket: region count exceeds its size");
  t.regions.resize(nr);
  for (auto& r : t.regions) r = rd.u32();
  uint32_t nb = rd.u32();
  if (nb > kMaxBlocks || nb > rd.remaining() / 8) fail(ErrorCode::kProtocol, "ticket: block count exceeds its size");
  t.blocks.resize(nb);
  for (auto& b : t.blocks) b = static_cast<int64_t>(rd.u64());
  t.timeout_ms = rd.u32();
  if (t.tp_size == 0 || t.tp_rank >= t.tp_size) {
    fail(ErrorCode::kProtocol, "ticket: tp rank " + std::to_string(t.tp_rank) + " of size " +
                                   std::to_string(t.tp_size) + " is impossible");
  }
  return t;
}

std::string note_prefix(const std::string& request_id) {
  Writer w;
  w.u32(kNoteMagic);
  w.bytes(request_id);
  return std::move(w.str());
}

// note_prefix | kind u8 | src_rank u32 | n_sources u32 | layer_begin u32 | layer_end u32 |
// group u32 | n_groups u32
std::string encode_note(const KvNote& n) {
  Writer w;
  const std::string prefix = note_prefix(n.request_id);
  w.raw(prefix.data(), prefix.size());
  w.u8(static_cast<uint8_t>(n.kind));
  w.u32(n.src_rank);
  w.u32(n.n_sources);
  w.u32(n.layer_begin);
  w.u32(n.layer_end);
  w.u32(n.group);
  w.u32(n.n_groups);
  return std::move(w.str());
}

bool decode_note(const std::string& bytes, KvNote* out) {
  if (bytes.size() < 4) return false;
  try {
    Reader rd(bytes, "note");
    if (rd.u32() != kNoteMagic) return false;
    out->request_id = rd.bytes(kMaxNotify);
    uint8_t kind = rd.u8();
    if (kind != 1 && kind != 2) return false;
    out->kind = static_cast<NoteKind>(kind);
    out->src_rank = rd.u32();
    out->n_sources = rd.u32();
    out->layer_begin = rd.u32();
    out->layer_end = rd.u32();
    out->group = rd.u32();
    out->n_groups = rd.u32();
    return out->n_groups > 0 && out->group < out->n_groups && out->layer_begin <= out->layer_end;
  } catch (const Error&) {
    return false;
  }
}

}  // namespace kvt::wire
