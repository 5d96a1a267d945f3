#include "plan/segment_planner.h"

#include <algorithm>
#include <optional>
#include <string>

#include "core/error.h"
#include "plan/loop_nest.h"

namespace kvt::plan {

namespace {

[[noreturn]] void invalid(const std::string& what) { fail(ErrorCode::kInvalidRequest, what); }

std::string str(int64_t v) { return std::to_string(v); }

// Appends a segment, extending the last one when both sides continue where it ended.
inline void append(std::vector<Segment>& out, size_t floor, int64_t s, int64_t d, int64_t len) {
  if (out.size() > floor) {
    Segment& b = out.back();
    if (b.src + b.len == s && b.dst + b.len == d) {
      b.len += len;
      return;
    }
  }
  out.push_back(Segment{s, d, len});
}

// The rows (relative offsets) of a run of n tokens, built on first use for each n.
class RowPatterns {
 public:
  RowPatterns(std::vector<Dim> fixed, int64_t src_token_stride, int64_t dst_token_stride,
              int64_t row_bytes, int64_t max_run)
      : fixed_(std::move(fixed)),
        src_ts_(src_token_stride),
        dst_ts_(dst_token_stride),
        row_bytes_(row_bytes),
        cache_(static_cast<size_t>(max_run) + 1) {}

  struct Rows {
    std::vector<int64_t> src;
    std::vector<int64_t> dst;
    int64_t len = 0;
  };

  LoopNest nest(int64_t n) const {
    std::vector<Dim> dims = fixed_;
    dims.push_back(Dim{n, src_ts_, dst_ts_});
    return LoopNest::collapse(std::move(dims), row_bytes_);
  }

  const Rows& get(int64_t n) {
    std::optional<Rows>& slot = cache_[static_cast<size_t>(n)];
    if (!slot) {
      const LoopNest ln = nest(n);
      Rows r;
      r.len = ln.row_bytes;
      r.src.reserve(static_cast<size_t>(ln.num_rows()));
      r.dst.reserve(static_cast<size_t>(ln.num_rows()));
      ln.rows(&r.src, &r.dst);
      slot = std::move(r);
    }
    return *slot;
  }

 private:
  std::vector<Dim> fixed_;  // heads (and planes when they fold into rows)
  int64_t src_ts_;
  int64_t dst_ts_;
  int64_t row_bytes_;
  std::vector<std::optional<Rows>> cache_;
};

struct Request {
  const PlaneSet& src;
  const PlaneSet& dst;
  const int64_t* src_blocks;
  const int64_t* dst_blocks;
  int64_t num_tokens;
  int64_t num_heads;
  int64_t src_head_off;  // bytes
  int64_t dst_head_off;
};

void check_blocks(const char* side, const int64_t* ids, size_t n, int64_t num_blocks) {
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_blocks) {
      invalid(std::string(side) + "_blocks[" + std::to_string(i) + "] = " + str(ids[i]) +
              " is out of range: that side has " + str(num_blocks) + " blocks");
    }
  }
}

// The segments of the whole token sequence for one plane (or, with planes folded into the row
// pattern, for a group of planes), relative to the first plane's offsets.
// Appends the rows of one run starting at (sb, db).
inline void append_rows(std::vector<Segment>& seq, const RowPatterns::Rows& rows, int64_t sb,
                        int64_t db) {
  const size_t nrows = rows.src.size();
  for (size_t k = 0; k < nrows; ++k) append(seq, 0, sb + rows.src[k], db + rows.dst[k], rows.len);
}

// Equal block sizes: every run is a whole block but maybe the last; one row per block is the
// common case (full heads, or HND head ranges) and gets a tight loop.
std::vector<Segment> sequence_same_blocks(const Request& r, RowPatterns& patterns) {
  std::vector<Segment> seq;
  const int64_t bs = r.src.block_size;
  const int64_t full = r.num_tokens / bs;
  const int64_t tail = r.num_tokens - full * bs;
  const int64_t ss = r.src.block_stride;
  const int64_t ds = r.dst.block_stride;
  const int64_t* sbk = r.src_blocks;
  const int64_t* dbk = r.dst_blocks;
  if (full > 0) {
    const RowPatterns::Rows& rows = patterns.get(bs);
    seq.reserve(static_cast<size_t>(full + 1) * rows.src.size());
    if (rows.src.size() == 1) {
      const int64_t rs = rows.src[0] + r.src_head_off;
      const int64_t rd = rows.dst[0] + r.dst_head_off;
      const int64_t len = rows.len;
      for (int64_t i = 0; i < full; ++i) append(seq, 0, sbk[i] * ss + rs, dbk[i] * ds + rd, len);
    } else {
      for (int64_t i = 0; i < full; ++i) {
        append_rows(seq, rows, sbk[i] * ss + r.src_head_off, dbk[i] * ds + r.dst_head_off);
      }
    }
  }
  if (tail > 0) {
    append_rows(seq, patterns.get(tail), sbk[full] * ss + r.src_head_off,
                dbk[full] * ds + r.dst_head_off);
  }
  return seq;
}

// The segments of the whole token sequence for one plane (or, with planes folded into the row
// pattern, for a group of planes), relative to the first plane's offsets. Runs are the token
// ranges within which neither side changes block, so any two block sizes work.
std::vector<Segment> sequence(const Request& r, RowPatterns& patterns) {
  const int64_t bss = r.src.block_size;
  const int64_t bsd = r.dst.block_size;
  if (bss == bsd) return sequence_same_blocks(r, patterns);
  std::vector<Segment> seq;
  const int64_t typical = std::min({bss, bsd, r.num_tokens});
  seq.reserve(static_cast<size_t>((r.num_tokens + typical - 1) / typical *
                                  static_cast<int64_t>(patterns.get(typical).src.size())));
  int64_t is = 0, ts = 0, id = 0, td = 0;
  for (int64_t p = 0; p < r.num_tokens;) {
    const int64_t n = std::min({bss - ts, bsd - td, r.num_tokens - p});
    append_rows(seq, patterns.get(n),
                r.src_blocks[is] * r.src.block_stride + ts * r.src.token_stride + r.src_head_off,
                r.dst_blocks[id] * r.dst.block_stride + td * r.dst.token_stride + r.dst_head_off);
    p += n;
    ts += n;
    td += n;
    if (ts == bss) {
      ts = 0;
      ++is;
    }
    if (td == bsd) {
      td = 0;
      ++id;
    }
  }
  return seq;
}

// Appends seq shifted by (so, dof). seq is merged already, so only its first segment can join
// what precedes it. The rest is copied as a block and then shifted in place: two tight loops
// instead of a push_back per segment (this is most of a large plan's time).
void emit(std::vector<Segment>& out, size_t floor, const std::vector<Segment>& seq, int64_t so,
          int64_t dof) {
  if (seq.empty()) return;
  const size_t need = out.size() + seq.size();
  if (need > out.capacity()) out.reserve(std::max(need, 2 * out.capacity()));
  append(out, floor, seq[0].src + so, seq[0].dst + dof, seq[0].len);
  const size_t base = out.size();
  out.insert(out.end(), seq.begin() + 1, seq.end());
  for (Segment *p = out.data() + base, *e = out.data() + out.size(); p != e; ++p) {
    p->src += so;
    p->dst += dof;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

Plan plan_segments(const PlaneSet& src, const PlaneSet& dst, const PlanRequest& req) {
  if (src.head_bytes != dst.head_bytes) {
    invalid("head sizes differ: source heads are " + str(src.head_bytes) +
            " bytes, destination heads " + str(dst.head_bytes) + " (head_dim x itemsize)");
  }
  const int64_t num_planes = static_cast<int64_t>(src.num_planes());
  if (num_planes != static_cast<int64_t>(dst.num_planes())) {
    invalid("plane counts differ: source " + str(num_planes) + ", destination " +
            str(static_cast<int64_t>(dst.num_planes())) + " (layers x K/V parts)");
  }
  const int64_t pb = req.plane_begin;
  const int64_t pe = req.plane_end < 0 ? num_planes : req.plane_end;
  if (pb < 0 || pb > pe || pe > num_planes) {
    invalid("plane range [" + str(pb) + ", " + str(pe) + ") is outside [0, " + str(num_planes) + ")");
  }

  int64_t nh = req.num_heads;
  if (nh < 0) {
    if (src.num_heads != dst.num_heads) {
      invalid("source has " + str(src.num_heads) + " heads and destination " + str(dst.num_heads) +
              ": give a head range (see kvtransfer.tp for tensor-parallel mappings)");
    }
    if (req.src_head != 0 || req.dst_head != 0) invalid("a head offset needs num_heads");
    nh = src.num_heads;
  }
  if (req.src_head < 0 || req.src_head + nh > src.num_heads) {
    invalid("source heads [" + str(req.src_head) + ", " + str(req.src_head + nh) +
            ") are outside the source's " + str(src.num_heads) + " heads");
  }
  if (req.dst_head < 0 || req.dst_head + nh > dst.num_heads) {
    invalid("destination heads [" + str(req.dst_head) + ", " + str(req.dst_head + nh) +
            ") are outside the destination's " + str(dst.num_heads) + " heads");
  }

  const int64_t ns = static_cast<int64_t>(req.num_src_blocks);
  const int64_t nd = static_cast<int64_t>(req.num_dst_blocks);
  int64_t tokens = req.num_tokens;
  if (tokens < 0) {
    if (src.block_size == dst.block_size && ns != nd) {
      invalid("src_blocks has " + str(ns) + " ids but dst_blocks has " + str(nd) +
              " (both sides use blocks of " + str(src.block_size) + " tokens)");
    }
    tokens = std::min(ns * src.block_size, nd * dst.block_size);
  }
  if (ceil_div(tokens, src.block_size) != ns || ceil_div(tokens, dst.block_size) != nd) {
    invalid(str(tokens) + " tokens need " + str(ceil_div(tokens, src.block_size)) +
            " source blocks of " + str(src.block_size) + " and " +
            str(ceil_div(tokens, dst.block_size)) + " destination blocks of " +
            str(dst.block_size) + ", but src_blocks has " + str(ns) + " ids and dst_blocks " +
            str(nd));
  }
  check_blocks("src", req.src_blocks, req.num_src_blocks, src.num_blocks);
  check_blocks("dst", req.dst_blocks, req.num_dst_blocks, dst.num_blocks);

  Plan plan;
  if (tokens == 0 || pb == pe || nh == 0) return plan;
  plan.nbytes = tokens * nh * src.head_bytes * (pe - pb);

  Request r{src, dst, req.src_blocks, req.dst_blocks, tokens, nh,
            req.src_head * src.head_stride, req.dst_head * dst.head_stride};
  const Dim heads{nh, src.head_stride, dst.head_stride};
  const int64_t max_run = std::min(src.block_size, dst.block_size);
  const int64_t typical = std::min(max_run, tokens);

  // Planes grouped by buffer pair, in plane order within a group.
  std::vector<int64_t> order;
  for (int64_t q = pb; q < pe; ++q) order.push_back(q);
  auto key = [&](int64_t q) { return std::make_pair(src.plane_buffer[q], dst.plane_buffer[q]); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });

  RowPatterns per_plane({heads}, src.token_stride, dst.token_stride, src.head_bytes, max_run);
  std::optional<std::vector<Segment>> per_plane_seq;  // shared by every group that needs it
  const size_t per_plane_loops = per_plane.nest(typical).loops.size();

  // Runs of planes at a constant stride, keyed by (count, src stride, dst stride): whether the
  // planes fold into the rows, and if so the folded sequence. Per-layer tensors (and the layers
  // of a per-layer-tensor cache in one buffer) repeat the same key, so each is worked out once.
  struct Fold {
    int64_t count, ps, pd;
    bool folded;
    std::vector<Segment> seq;
  };
  std::vector<Fold> folds;
  constexpr size_t kNoFold = static_cast<size_t>(-1);

  // Whether planes order[k0, k0 + count) sit at one positive stride (*ps, *pd) on both sides.
  auto regular = [&](size_t k0, size_t count, int64_t* ps, int64_t* pd) {
    if (count < 2) return false;
    *ps = src.plane_offset[order[k0 + 1]] - src.plane_offset[order[k0]];
    *pd = dst.plane_offset[order[k0 + 1]] - dst.plane_offset[order[k0]];
    if (*ps <= 0 || *pd <= 0) return false;
    for (size_t k = k0 + 2; k < k0 + count; ++k) {
      if (src.plane_offset[order[k]] - src.plane_offset[order[k - 1]] != *ps ||
          dst.plane_offset[order[k]] - dst.plane_offset[order[k - 1]] != *pd) {
        return false;
      }
    }
    return true;
  };

  // Planes at a regular stride fold into the row pattern when that costs no extra loop (the
  // stride continues the rows of one block: cross-layer layouts, FlashInfer's K|V blocks, vLLM
  // CPU's K|V-interleaved heads). Returns the index in folds of `count` planes at (ps, pd), or
  // kNoFold.
  auto fold_of = [&](int64_t count, int64_t ps, int64_t pd) -> size_t {
    for (size_t i = 0; i < folds.size(); ++i) {
      const Fold& f = folds[i];
      if (f.count == count && f.ps == ps && f.pd == pd) return f.folded ? i : kNoFold;
    }
    RowPatterns with_planes({heads, Dim{count, ps, pd}}, src.token_stride, dst.token_stride,
                            src.head_bytes, max_run);
    Fold f{count, ps, pd, with_planes.nest(typical).loops.size() <= per_plane_loops, {}};
    if (f.folded) f.seq = sequence(r, with_planes);
    folds.push_back(std::move(f));
    return folds.back().folded ? folds.size() - 1 : kNoFold;
  };

  // Emits planes order[k0, k1) one by one from the per-plane sequence.
  auto emit_planes = [&](size_t floor, size_t k0, size_t k1) {
    if (!per_plane_seq) {
      per_plane_seq = sequence(r, per_plane);
      // Every remaining plane emits at most this many: one allocation for the whole plan.
      plan.segments.reserve(plan.segments.size() +
                            static_cast<size_t>(pe - pb) * per_plane_seq->size());
    }
    for (size_t k = k0; k < k1; ++k) {
      emit(plan.segments, floor, *per_plane_seq, src.plane_offset[order[k]],
           dst.plane_offset[order[k]]);
    }
  };

  std::vector<size_t> chunks;  // the fold of each chunk of a group, reused across groups
  size_t g0 = 0;
  while (g0 < order.size()) {
    size_t g1 = g0 + 1;
    while (g1 < order.size() && key(order[g1]) == key(order[g0])) ++g1;
    const size_t floor = plan.segments.size();
    const int64_t q0 = order[g0];
    const size_t count = g1 - g0;

    int64_t ps = 0, pd = 0;
    size_t whole = kNoFold;
    chunks.clear();
    if (regular(g0, count, &ps, &pd)) {
      // One stride over the group: fold all of it, or nothing. (A chunk of c planes at that
      // stride could fold only into a dimension of stride c * ps, which would overlap plane c.)
      whole = fold_of(static_cast<int64_t>(count), ps, pd);
    } else {
      // No one stride (vLLM CPU's BHT(KD) in one buffer: K->V is head_dim bytes, V->next K a
      // layer tensor less that): fold chunks of c consecutive planes (c = kv_parts there, each
      // layer's K and V), the largest c dividing the group for which every chunk folds.
      for (size_t c = count / 2; c >= 2 && chunks.empty(); --c) {
        if (count % c != 0) continue;
        for (size_t k = g0; k < g1; k += c) {
          const size_t f =
              regular(k, c, &ps, &pd) ? fold_of(static_cast<int64_t>(c), ps, pd) : kNoFold;
          if (f == kNoFold) break;
          chunks.push_back(f);
        }
        if (chunks.size() != count / c) chunks.clear();
      }
    }
    if (whole != kNoFold) {
      emit(plan.segments, floor, folds[whole].seq, src.plane_offset[q0], dst.plane_offset[q0]);
    } else if (!chunks.empty()) {
      const size_t c = count / chunks.size();
      for (size_t i = 0; i < chunks.size(); ++i) {
        const int64_t q = order[g0 + i * c];
        emit(plan.segments, floor, folds[chunks[i]].seq, src.plane_offset[q], dst.plane_offset[q]);
      }
    } else {
      emit_planes(floor, g0, g1);
    }
    plan.groups.push_back(PlanGroup{src.plane_buffer[q0], dst.plane_buffer[q0],
                                    static_cast<int64_t>(floor),
                                    static_cast<int64_t>(plan.segments.size())});
    g0 = g1;
  }
  return plan;
}

}  // namespace kvt::plan
