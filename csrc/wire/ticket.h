// Tickets: what one side of a KV transfer tells the other about a request, as versioned bytes
// (never pickle). An "expect" ticket comes from the decode side (where blocks must land), an
// "offer" ticket from the prefill side (where they can be read from).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvt::wire {

enum class TicketKind : uint8_t { kExpect = 1, kOffer = 2 };

struct Ticket {
  TicketKind kind = TicketKind::kExpect;
  std::string request_id;
  std::string endpoint_info;  // ep.info() bytes of the side that made it
  uint32_t tp_rank = 0;
  uint32_t tp_size = 1;
  std::string fingerprint;  // layout fingerprint (layouts must agree)
  std::string descriptor;   // cache descriptor (buffers, planes, layout), kvtransfer.cache
  std::vector<uint32_t> regions;  // region id of each buffer
  std::vector<int64_t> blocks;    // block ids in token order
  uint32_t timeout_ms = 0;        // how long the maker waits for the request
};

// The notification payload of one KV write or read: which request, which source rank (of how
// many feeding this destination), which layers, and which of the writes for those layers.
enum class NoteKind : uint8_t { kLayers = 1, kPulled = 2 };

struct KvNote {
  NoteKind kind = NoteKind::kLayers;
  std::string request_id;
  uint32_t src_rank = 0;
  uint32_t n_sources = 1;
  uint32_t layer_begin = 0;
  uint32_t layer_end = 0;
  uint32_t group = 0;
  uint32_t n_groups = 1;
};

std::string encode_note(const KvNote& n);
// Returns false (no throw) for payloads that are not KV notes: the endpoint may carry others.
bool decode_note(const std::string& bytes, KvNote* out);
// The bytes every note of `request_id` starts with (to refuse a cancelled request's transfers).
std::string note_prefix(const std::string& request_id);

std::string encode_ticket(const Ticket& t);
Ticket decode_ticket(const std::string& bytes);  // throws ProtocolError on malformed input

}  // namespace kvt::wire
