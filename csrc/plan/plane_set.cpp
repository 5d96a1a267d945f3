#include "plan/plane_set.h"

#include <string>

#include "core/error.h"

namespace kvt::plan {

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) fail(ErrorCode::kInvalidRequest, "plane set: " + what);
}

}  // namespace

int64_t PlaneSet::plane_extent() const {
  return (num_blocks - 1) * block_stride + (block_size - 1) * token_stride +
         (num_heads - 1) * head_stride + head_bytes;
}

void PlaneSet::validate() const {
  require(num_blocks > 0, "num_blocks must be positive, got " + std::to_string(num_blocks));
  require(block_size > 0, "block_size must be positive, got " + std::to_string(block_size));
  require(num_heads > 0, "num_heads must be positive, got " + std::to_string(num_heads));
  require(head_bytes > 0, "head_bytes must be positive, got " + std::to_string(head_bytes));
  require(block_stride >= 0 && token_stride >= 0 && head_stride >= 0,
          "strides must not be negative");
  require(num_blocks == 1 || block_stride > 0, "block_stride must be positive");
  require(block_size == 1 || token_stride > 0, "token_stride must be positive");
  require(num_heads == 1 || head_stride > 0, "head_stride must be positive");
  require(plane_buffer.size() == plane_offset.size(), "plane_buffer and plane_offset differ in size");
  const int64_t extent = plane_extent();
  for (size_t q = 0; q < plane_offset.size(); ++q) {
    const int64_t b = plane_buffer[q];
    require(b >= 0 && b < static_cast<int64_t>(buffer_nbytes.size()),
            "plane " + std::to_string(q) + " names buffer " + std::to_string(b) + " but there are " +
                std::to_string(buffer_nbytes.size()));
    const int64_t off = plane_offset[q];
    require(off >= 0 && off + extent <= buffer_nbytes[b],
            "plane " + std::to_string(q) + " spans bytes [" + std::to_string(off) + ", " +
                std::to_string(off + extent) + ") but buffer " + std::to_string(b) + " has " +
                std::to_string(buffer_nbytes[b]));
  }
}

}  // namespace kvt::plan
