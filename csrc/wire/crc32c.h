// CRC-32C (Castagnoli), the checksum of every control frame and data-frame header.
#pragma once

#include <cstddef>
#include <cstdint>

struct iovec;

namespace kvt::wire {

// Extends `crc` (start with 0) over `len` bytes. Uses SSE4.2's crc32 instruction when the CPU
// has it, a table otherwise; both give the same value.
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

// Over the concatenation of iov[0..n).
uint32_t crc32c_iov(const struct iovec* iov, size_t n);

inline void put_u32_le(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint32_t get_u32_le(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}

}  // namespace kvt::wire
