// The cma arrival ring (transport/cma/cma_arrival_ring.h) as a target reads it: shared memory
// an initiator process writes, so every byte of it is the peer's. The input is the ring's
// memory (header, then records; zero-filled past the input). The target takes records until
// there is none or it refuses the ring; what it takes must be within the ring's limits.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>

#include "common.h"
#include "transport/cma/cma_arrival_ring.h"

using namespace kvt::cma;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  alignas(64) static char mem[ArrivalRing::bytes()];  // aligned as the mapping is
  std::memset(mem, 0, sizeof mem);
  std::memcpy(mem, data, std::min(size, sizeof mem));
  ArrivalRing ring(mem);
  uint32_t taken = 0;
  Arrival a;
  fuzz::decodes([&] {
    while (ring.pop(a)) {
      FUZZ_CHECK(a.text.size() <= kRingText);
      FUZZ_CHECK(++taken <= kRingSlots);
    }
  });
  return 0;
}
