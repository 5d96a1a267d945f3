// CRC-32C (Castagnoli), the checksum of every control frame and data-frame header.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvt::wire {

// Extends `crc` (start with 0) over `len` bytes. Uses SSE4.2's crc32 instruction when the CPU
// has it, a table otherwise; both give the same value.
uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

}  // namespace kvt::wire
