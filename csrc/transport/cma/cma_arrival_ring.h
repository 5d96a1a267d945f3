// "Units of transfer S landed" records in shared memory, for a target that polls for them (a
// spinning waiter): the initiator then sends no socket record and the waiter makes no system
// call to receive one, which is two of the few system calls on cma's latency path.
//
// The ring lives after the in-flight counters in the session's busy-board memfd
// (cma_region_table.h), so the welcome is unchanged: an initiator that finds the memfd too short
// for a ring (an older target) sends every record on the socket, and an older initiator never
// writes the ring. One producer (the initiator, its threads serialized by a mutex), one
// consumer (the target's thread holding the session's reader lock).
//
// The target says in `polled` whether a waiter polls the ring; records are sent on the socket
// otherwise, and a record put in the ring while `polled` turned 0 is followed by a doorbell:
//   initiator: polled? -> write record; tail = t + 1; polled still? no -> doorbell record
//   target, as its last spinning waiter stops: polled = 0; then it takes what the ring holds
// Both sides order their store before their load (sequentially consistent), so either the
// initiator sees polled == 0 and rings, or the target's drain finds the record.
//
// The initiator is not trusted: the target keeps its own head, copies each record out of the
// shared memory before reading it, and treats a tail beyond the ring or a malformed record as a
// protocol error of that session.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace kvt::cma {

constexpr uint32_t kRingSlots = 64;
constexpr uint32_t kRingText = 232;  // a BEGIN carrying a notification of up to ~170 bytes

struct RingRecord {
  uint64_t slot;
  uint32_t units;
  uint32_t text_len;
  char text[kRingText];
};
static_assert(sizeof(RingRecord) == 248);

struct alignas(64) RingHeader {
  alignas(64) uint64_t tail;     // records written: the initiator's
  alignas(64) uint64_t head;     // records taken: the target's (a copy, for the initiator)
  alignas(64) uint32_t polled;   // 1 while a waiter of the target polls the ring
};

struct Arrival {
  uint64_t slot = 0;
  uint32_t units = 0;
  std::string text;  // the transfer's BEGIN, when carried
};

class ArrivalRing {
 public:
  static constexpr size_t bytes() { return sizeof(RingHeader) + kRingSlots * sizeof(RingRecord); }
  explicit ArrivalRing(char* base) : base_(base) {}

  // Initiator.
  bool polled() const;
  // Puts the record in the ring; false when it is full or `text` is too long for it.
  bool push(uint64_t slot, uint32_t units, const std::string& text);

  // Target.
  void set_polled(bool on);
  // Takes the next record; false when there is none. Throws ProtocolError when the initiator
  // left the ring in a state no initiator of ours writes.
  bool pop(Arrival& out);

 private:
  RingHeader& header() const { return *reinterpret_cast<RingHeader*>(base_); }
  RingRecord& record(uint64_t n) const {
    return reinterpret_cast<RingRecord*>(base_ + sizeof(RingHeader))[n % kRingSlots];
  }
  char* base_;
  uint64_t head_ = 0;  // target: its own count, never read back from shared memory
};

}  // namespace kvt::cma
