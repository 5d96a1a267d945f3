#include "transport/cma/cma_arrival_ring.h"

#include <cstring>

#include "core/error.h"

namespace kvt::cma {

bool ArrivalRing::polled() const { return __atomic_load_n(&header().polled, __ATOMIC_SEQ_CST) != 0; }

bool ArrivalRing::push(uint64_t slot, uint32_t units, const std::string& text) {
  if (text.size() > kRingText) return false;
  RingHeader& h = header();
  const uint64_t tail = __atomic_load_n(&h.tail, __ATOMIC_RELAXED);  // only we write it
  if (tail - __atomic_load_n(&h.head, __ATOMIC_ACQUIRE) >= kRingSlots) return false;
  RingRecord& r = record(tail);
  r.slot = slot;
  r.units = units;
  r.text_len = static_cast<uint32_t>(text.size());
  std::memcpy(r.text, text.data(), text.size());
  __atomic_store_n(&h.tail, tail + 1, __ATOMIC_SEQ_CST);  // publishes the record
  return true;
}

void ArrivalRing::set_polled(bool on) { __atomic_store_n(&header().polled, on ? 1u : 0u, __ATOMIC_SEQ_CST); }

bool ArrivalRing::pop(Arrival& out) {
  const uint64_t tail = __atomic_load_n(&header().tail, __ATOMIC_SEQ_CST);
  if (tail == head_) return false;
  if (tail - head_ > kRingSlots) {
    fail(ErrorCode::kProtocol, "cma: the initiator's arrival ring claims " +
                                   std::to_string(tail - head_) + " records in " +
                                   std::to_string(kRingSlots) + " slots");
  }
  RingRecord r;
  std::memcpy(&r, &record(head_), sizeof r);  // the initiator may still scribble on the slot
  if (r.text_len > kRingText) {
    fail(ErrorCode::kProtocol, "cma: an arrival record of transfer " + std::to_string(r.slot) +
                                   " claims " + std::to_string(r.text_len) + " bytes of text (at most " +
                                   std::to_string(kRingText) + ")");
  }
  out.slot = r.slot;
  out.units = r.units;
  out.text.assign(r.text, r.text_len);
  ++head_;
  __atomic_store_n(&header().head, head_, __ATOMIC_RELEASE);  // frees the slot
  return true;
}

}  // namespace kvt::cma
