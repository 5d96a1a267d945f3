// A strided copy of a small box (tokens x heads x planes x bytes) between two memory layouts,
// reduced to the fewest loops: dimensions that are contiguous with the next inner one on BOTH
// sides merge, so e.g. all heads of an NHD token are one row, and a whole NHD block is one row.
#pragma once

#include <cstdint>
#include <vector>

namespace kvt::plan {

struct Dim {
  int64_t size;
  int64_t src_stride;  // bytes
  int64_t dst_stride;  // bytes
};

struct LoopNest {
  std::vector<Dim> loops;  // outer to inner, without the contiguous row
  int64_t row_bytes = 0;   // contiguous bytes on both sides at each loop position

  // Orders the dims by source stride (outer first), drops those of size 1, appends a
  // contiguous innermost row of row_bytes, and merges neighbours that are contiguous on both
  // sides.
  static LoopNest collapse(std::vector<Dim> dims, int64_t row_bytes);

  int64_t num_rows() const;

  // Appends the (src, dst) byte offset of every row, in loop order.
  void rows(std::vector<int64_t>* src, std::vector<int64_t>* dst) const;
};

}  // namespace kvt::plan
