#pragma once

#include <cstdint>

namespace kvt::wire {

// Bumped on any incompatible change of a frame or message layout (docs/wire-format.md).
constexpr uint16_t kProtocolVersion = 2;  // 2: the kBegin data frame
constexpr uint32_t kControlMagic = 0x4354564B;  // "KVTC" little-endian
constexpr uint32_t kDataMagic = 0x4454564B;     // "KVTD"
constexpr uint32_t kInfoMagic = 0x4954564B;     // "KVTI"
constexpr uint32_t kMaxNotify = 4096;

}  // namespace kvt::wire
