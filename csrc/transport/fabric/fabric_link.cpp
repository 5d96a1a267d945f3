#include "transport/fabric/fabric_link.h"

#include <algorithm>

#include "core/error.h"
#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {
namespace {

class FabricPrepared : public PreparedOp {
 public:
  std::unique_ptr<Batch> batch;
};

}  // namespace

FabricLink::FabricLink(std::shared_ptr<FabricCore> core, uint64_t peer, Connection conn)
    : core_(std::move(core)), peer_(peer), id_(core_->new_link_id()), conn_(std::move(conn)) {
  core_->add_link(id_, conn_);
}

FabricLink::~FabricLink() { close(); }

std::unique_ptr<PreparedOp> FabricLink::prepare(OpRequest op) {
  const bool write = op.kind == OpKind::kWrite;
  if (!write && !core_->rdma_read()) {
    fail(ErrorCode::kInvalidRequest,
         "fabric provider " + core_->provider() + " does not support RDMA read here; use push "
         "(write) from the side that has the data instead of pulling it");
  }
  if (core_->region_retired(id_, op.remote.id)) {
    fail(ErrorCode::kInvalidRequest, "peer region " + std::to_string(op.remote.id) +
                                         " was deregistered");
  }
  std::vector<RailKey> keys = decode_rkey(op.remote.rkey);
  if (keys.size() != conn_.remote_rails) {
    fail(ErrorCode::kProtocol, "peer's key for region " + std::to_string(op.remote.id) + " names " +
                                   std::to_string(keys.size()) + " rails, its address " +
                                   std::to_string(conn_.remote_rails));
  }
  const std::vector<void*> desc = core_->descriptors(op.local->id);
  const size_t n_local = core_->rail_count();
  const size_t lanes = std::max(n_local, conn_.remote_rails);
  size_t max_pieces = SIZE_MAX;
  uint64_t max_bytes = lanes > 1 ? kStripeBytes : kUnitBytes;
  for (size_t r = 0; r < n_local; ++r) {
    const RailLimits& lim = core_->rail(r).limits();
    max_pieces = std::min({max_pieces, lim.iov_limit, lim.rma_iov_limit});
    max_bytes = std::min(max_bytes, lim.max_msg_size);
  }

  auto prepared = std::make_unique<FabricPrepared>();
  auto b = std::make_unique<Batch>();
  b->slot = op.slot;
  b->kind = op.kind;
  b->link = id_;
  b->peer = peer_;
  b->region = op.remote.id;
  b->hold = op.local;
  const uint32_t seq = next_seq_++ & kSeqMask;
  b->tag = conn_.tag;
  b->seq = seq;
  b->target = conn_.dest[0][0];
  const uint64_t imm = make_imm(conn_.tag, seq);
  uint64_t unit_bytes = 0;
  size_t remote_rail = 0;
  auto open_unit = [&] {
    Unit u;
    u.kind = write ? CtxKind::kWrite : CtxKind::kRead;
    size_t lane = b->units.size() % lanes;
    u.rail = static_cast<uint32_t>(lane % n_local);
    remote_rail = lane % conn_.remote_rails;
    u.dest = conn_.dest[u.rail][remote_rail];
    u.imm = imm;
    b->units.push_back(std::move(u));
    unit_bytes = 0;
  };
  char* base = op.local->base;
  for (const Segment& s : op.segments) {
    const uint64_t local_off = write ? s.src_off : s.dst_off;
    const uint64_t remote_off = write ? s.dst_off : s.src_off;
    uint64_t done = 0;
    while (done < s.len) {
      if (b->units.empty() || b->units.back().iov.size() == max_pieces || unit_bytes == max_bytes) {
        open_unit();
      }
      Unit& u = b->units.back();
      uint64_t piece = std::min(s.len - done, max_bytes - unit_bytes);
      u.iov.push_back(iovec{base + local_off + done, piece});
      u.desc.push_back(desc[u.rail]);
      const RailKey& k = keys[remote_rail];
      u.rma.push_back(fi_rma_iov{k.base + remote_off + done, piece, k.key});
      unit_bytes += piece;
      done += piece;
    }
  }
  for (auto& u : b->units) u.batch = b.get();
  if (!b->units.empty()) {
    Msg m;
    m.type = write ? MsgType::kMap : MsgType::kReadBegin;
    m.tag = conn_.tag;
    m.seq = seq;
    m.units = static_cast<uint32_t>(b->units.size());
    m.slot = op.slot;
    m.region = op.remote.id;
    m.key = op.remote.key;
    b->map.bytes = encode_msg(m);
    b->map.dest = conn_.dest[0][0];
    b->map.batch = b.get();
  }
  prepared->units = static_cast<uint32_t>(b->units.size());
  prepared->batch = std::move(b);
  return prepared;
}

void FabricLink::post(std::unique_ptr<PreparedOp> op) {
  std::unique_ptr<Batch> b = std::move(static_cast<FabricPrepared&>(*op).batch);
  if (!b || b->units.empty()) return;
  if (closed_.load() || core_->stopping()) {
    core_->sink().on_op_failed(b->slot, Error(ErrorCode::kTransport, "fabric link to the peer is closed"));
    return;
  }
  core_->post_batch(std::move(b));
}

void FabricLink::close() {
  if (closed_.exchange(true)) return;
  if (core_->stopping()) return;
  core_->remove_link(id_);
  // Whatever the provider still holds keeps its memory registered; left to shutdown if slow.
  if (core_->cancel_link(id_, kDrainS)) core_->disconnect(conn_);
}

}  // namespace kvt::fabric
