#include "plan/loop_nest.h"

#include <algorithm>

namespace kvt::plan {

LoopNest LoopNest::collapse(std::vector<Dim> dims, int64_t row_bytes) {
  dims.erase(std::remove_if(dims.begin(), dims.end(), [](const Dim& d) { return d.size == 1; }),
             dims.end());
  std::stable_sort(dims.begin(), dims.end(), [](const Dim& a, const Dim& b) {
    return a.src_stride != b.src_stride ? a.src_stride > b.src_stride : a.dst_stride > b.dst_stride;
  });
  dims.push_back(Dim{row_bytes, 1, 1});
  std::vector<Dim> merged;
  merged.reserve(dims.size());
  for (const Dim& d : dims) {
    if (!merged.empty()) {
      Dim& outer = merged.back();
      if (outer.src_stride == d.size * d.src_stride && outer.dst_stride == d.size * d.dst_stride) {
        outer = Dim{outer.size * d.size, d.src_stride, d.dst_stride};
        continue;
      }
    }
    merged.push_back(d);
  }
  LoopNest nest;
  nest.row_bytes = merged.back().size;  // strides (1, 1): the bytes of a head, maybe more
  merged.pop_back();
  nest.loops = std::move(merged);
  return nest;
}

int64_t LoopNest::num_rows() const {
  int64_t n = 1;
  for (const Dim& d : loops) n *= d.size;
  return n;
}

void LoopNest::rows(std::vector<int64_t>* src, std::vector<int64_t>* dst) const {
  const size_t depth = loops.size();
  std::vector<int64_t> index(depth, 0);
  const int64_t total = num_rows();
  int64_t s = 0;
  int64_t d = 0;
  for (int64_t r = 0; r < total; ++r) {
    src->push_back(s);
    dst->push_back(d);
    // Odometer step: advance the innermost loop, carrying outward.
    for (size_t k = depth; k-- > 0;) {
      const Dim& dim = loops[k];
      if (++index[k] < dim.size) {
        s += dim.src_stride;
        d += dim.dst_stride;
        break;
      }
      index[k] = 0;
      s -= (dim.size - 1) * dim.src_stride;
      d -= (dim.size - 1) * dim.dst_stride;
    }
  }
}

}  // namespace kvt::plan
