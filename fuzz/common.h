// Shared helpers of the libFuzzer harnesses: a decoder may refuse input only by throwing
// kvt::Error (with the expected code); any other exception, crash, sanitizer report, or a
// decoded value that does not survive re-encoding is a bug and aborts the run.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/error.h"

#define FUZZ_CHECK(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "FUZZ_CHECK failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)

namespace fuzz {

// Runs `f`; returns true when it decoded, false when it refused with a kvt::Error whose code is
// one of the allowed ones. Anything else escapes and libFuzzer reports it as a crash.
template <class F>
bool decodes(F&& f, kvt::ErrorCode allowed = kvt::ErrorCode::kProtocol,
             kvt::ErrorCode also = kvt::ErrorCode::kProtocol) {
  try {
    f();
    return true;
  } catch (const kvt::Error& e) {
    if (e.code() != allowed && e.code() != also) {
      std::fprintf(stderr, "decoder refused with unexpected error code %d: %s\n",
                   static_cast<int>(e.code()), e.what());
      std::abort();
    }
    return false;
  }
}

inline uint32_t le32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

inline void put_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace fuzz
