// One side of a KV-cache transfer, as the planner sees it: a set of "planes" (one per layer and
// K/V part) that share one geometry. Block b, token t, head h of plane q starts at byte
//   plane_offset[q] + b * block_stride + t * token_stride + h * head_stride
// of buffer plane_buffer[q], and its head_bytes bytes are contiguous. Buffers are the memory
// regions the transport moves bytes between; offsets are relative to the buffer's start.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvt::plan {

struct PlaneSet {
  int64_t num_blocks = 0;
  int64_t block_size = 0;  // tokens per block
  int64_t num_heads = 0;
  int64_t head_bytes = 0;  // head_dim * itemsize, contiguous
  int64_t block_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  std::vector<int64_t> plane_buffer;  // buffer index of each plane
  std::vector<int64_t> plane_offset;  // byte offset of (block 0, token 0, head 0) in that buffer
  std::vector<int64_t> buffer_nbytes;

  size_t num_planes() const { return plane_offset.size(); }

  // Bytes from a plane's offset to one past its last byte.
  int64_t plane_extent() const;

  // Throws kvt::Error(kInvalidRequest) naming the first inconsistency: a non-positive size, a
  // plane outside its buffer, a buffer index out of range.
  void validate() const;
};

}  // namespace kvt::plan
