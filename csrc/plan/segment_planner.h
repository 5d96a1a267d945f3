// Block tables -> coalesced (src_off, dst_off, len) segments between two PlaneSets.
//
// A request names, for each side, the blocks a request owns (in token order), a range of planes
// (layers x K/V parts, numbered the same on both sides), and optionally a head range: heads
// [src_head, src_head + num_heads) of the source land at [dst_head, dst_head + num_heads) of the
// destination (heterogeneous tensor parallelism). Token slot p of the request lives in block
// blocks[p / block_size] at slot p % block_size on each side, so the two sides may use
// different block sizes.
//
// Output: segments grouped by buffer pair (src buffer, dst buffer); within a group, runs that are
// adjacent on both sides are merged (consecutive blocks of a sequential table become one
// segment; in a cross-layer layout the layers of one block become one segment). Planes at one
// regular stride on both sides fold into the row pattern when that stride continues a block's
// rows; planes with no single stride fold in equal chunks that each have one (vLLM CPU's
// BHT(KD) with all layers in one buffer: each layer's K and V, so a block of a layer is one
// segment). The work is O(blocks + segments): the segment pattern of one plane (or chunk) is
// computed once and replicated for the others by adding plane offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "plan/plane_set.h"

namespace kvt::plan {

struct Segment {
  int64_t src;
  int64_t dst;
  int64_t len;
};
static_assert(sizeof(Segment) == 3 * sizeof(int64_t), "Segment must map onto an int64 [N, 3] array");

struct PlanGroup {
  int64_t src_buffer;
  int64_t dst_buffer;
  int64_t begin;  // rows [begin, end) of Plan::segments
  int64_t end;
};

struct PlanRequest {
  const int64_t* src_blocks = nullptr;
  size_t num_src_blocks = 0;
  const int64_t* dst_blocks = nullptr;
  size_t num_dst_blocks = 0;
  int64_t plane_begin = 0;
  int64_t plane_end = -1;  // -1: every plane
  int64_t src_head = 0;
  int64_t num_heads = -1;  // -1: all heads (both sides must have the same count)
  int64_t dst_head = 0;
  int64_t num_tokens = -1;  // -1: every slot of the blocks (see plan_segments)
};

struct Plan {
  std::vector<Segment> segments;
  std::vector<PlanGroup> groups;
  int64_t nbytes = 0;
};

// Throws kvt::Error(kInvalidRequest) for a block id out of range, block lists whose lengths do
// not match num_tokens (or each other), a head range outside either side, a plane range out of
// bounds, or sides whose head_bytes or plane counts differ.
//
// num_tokens < 0: equal block sizes need equally long block lists and move every slot; with
// different block sizes, min(src capacity, dst capacity) slots move. Either way each list must
// hold exactly ceil(num_tokens / block_size) ids.
Plan plan_segments(const PlaneSet& src, const PlaneSet& dst, const PlanRequest& req);

}  // namespace kvt::plan
