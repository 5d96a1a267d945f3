#include "transport/fabric/fabric_core.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "transport/fabric/fabric_loader.h"
#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {
namespace {

bool peer_unreachable(int err) {
  switch (err) {
    case FI_ECONNRESET:
    case FI_ECONNREFUSED:
    case FI_ECONNABORTED:
    case FI_EHOSTUNREACH:
    case FI_ENOTCONN:
    case FI_ESHUTDOWN:
    case FI_ETIMEDOUT:
    case FI_ECANCELED:  // we never cancel: the provider tore the connection down (rxm)
      return true;
    default:
      return false;
  }
}

std::string op_name(const Batch& b) {
  return b.kind == OpKind::kWrite ? "fabric write" : "fabric read";
}

}  // namespace

FabricCore::FabricCore(TransportContext ctx) : ctx_(std::move(ctx)) {
  load_library();
  Selection sel = select_rails(parse_provider_spec(ctx_.options.provider), ctx_.options.listen_host);
  provider_ = sel.provider;
  rdma_read_ = sel.rdma_read;
  hmem_ = sel.hmem;
  const char* fault = std::getenv("KVTRANSFER_FABRIC_FAULT");
  fault_bad_rkey_ = fault && std::strcmp(fault, "bad_rkey") == 0;
  try {
    for (size_t i = 0; i < sel.rails.size(); ++i) {
      rails_.push_back(std::make_unique<Rail>(static_cast<uint32_t>(i), std::move(sel.rails[i]), *this));
    }
    std::vector<Rail*> raw;
    for (auto& r : rails_) raw.push_back(r.get());
    mrs_ = std::make_unique<MrTable>(raw);
    FabricAddress a;
    a.provider = provider_;
    for (auto& r : rails_) a.rails.push_back(RailAddress{r->domain_name(), r->raw_address()});
    address_ = encode_address(a);
    probe_efa();
  } catch (...) {
    shutdown();
    throw;
  }
}

FabricCore::~FabricCore() {
  shutdown();
  // A rail whose completion thread is stuck inside the provider keeps everything it may touch.
  bool stuck = false;
  for (auto& r : rails_) {
    if (r && r->abandoned()) {
      stuck = true;
      (void)r.release();
    }
  }
  if (stuck) (void)mrs_.release();
}

TransportCaps FabricCore::caps() const {
  TransportCaps c;
  c.name = "fabric:" + provider_;
  c.rdma_read = rdma_read_;
  c.ordered = false;  // never relied upon: EFA's SRD and rxd reorder
  c.software_key_check = false;
  return c;
}

// EFA: say what the device does natively. Emulated RDMA (older EFA generations, some instance
// types) still moves every byte correctly, only slower; missing FI_READ was handled at
// selection (push only). The option numbers are fixed ABI (fi_ext.h of libfabric >= 1.18);
// a library that does not know them answers -FI_ENOPROTOOPT and we stay silent.
void FabricCore::probe_efa() {
#ifdef FI_PROV_SPECIFIC_EFA
  if (provider_ != "efa") return;
  const int kEmulatedRead = -FI_PROV_SPECIFIC_EFA + 1;
  const int kEmulatedWrite = -FI_PROV_SPECIFIC_EFA + 2;
  for (auto& r : rails_) {
    for (auto [opt, what] : {std::pair<int, const char*>{kEmulatedWrite, "write"},
                             std::pair<int, const char*>{kEmulatedRead, "read"}}) {
      if (opt == kEmulatedRead && !rdma_read_) continue;
      bool emulated = false;
      size_t len = sizeof emulated;
      if (fi_getopt(&r->ep()->fid, FI_OPT_ENDPOINT, opt, &emulated, &len) == 0 && emulated) {
        std::fprintf(stderr,
                     "kvtransfer: efa on %s emulates RDMA %s (no device support here): "
                     "transfers are correct but slower\n",
                     r->domain_name().c_str(), what);
      }
    }
  }
#endif
  if (!rdma_read_) {
    std::fprintf(stderr, "kvtransfer: fabric provider %s offers no RDMA read here: push (write) "
                         "only; reads raise InvalidRequestError\n", provider_.c_str());
  }
}

// ---------------------------------------------------------------- sessions

void FabricCore::end_session(uint64_t peer) {
  for (fi_addr_t a : sessions_.end(peer)) {
    if (!stopping_) rails_[0]->remove(a);
  }
}

Connection FabricCore::connect(const std::string& remote_address, uint64_t token) {
  if (stopping_) fail(ErrorCode::kTransport, "fabric transport is shut down");
  FabricAddress a = decode_address(remote_address);
  if (a.provider != provider_) {
    fail(ErrorCode::kProtocol, "peer uses fabric provider '" + a.provider + "', this endpoint '" +
                                   provider_ + "'");
  }
  Connection c;
  c.remote_rails = a.rails.size();
  c.dest.assign(rails_.size(), std::vector<fi_addr_t>(c.remote_rails, FI_ADDR_UNSPEC));
  try {
    for (size_t i = 0; i < rails_.size(); ++i) {
      for (size_t j = 0; j < c.remote_rails; ++j) c.dest[i][j] = rails_[i]->insert(a.rails[j].raw);
    }
  } catch (...) {
    disconnect(c);
    throw;
  }
  // Hello: the peer's rail 0 gives this session its tag and learns where to answer.
  {
    std::lock_guard<std::mutex> lock(mu_);
    hellos_[token] = HelloWait{};
  }
  auto* s = new OwnedSend;
  s->hello = true;
  s->token = token;
  s->dest = c.dest[0][0];
  Msg m;
  m.type = MsgType::kHello;
  m.token = token;
  m.reply_to = rails_[0]->raw_address();
  s->bytes = encode_msg(m);
  send_owned(0, s);
  HelloWait result;
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::duration<double>(ctx_.options.connect_timeout_s),
                 [&] { return hellos_[token].done || stopping_.load(); });
    result = hellos_[token];
    hellos_.erase(token);
  }
  std::string error = result.error;
  if (!result.done && error.empty()) {
    error = stopping_ ? "the transport was shut down"
                      : "no answer within " + std::to_string(ctx_.options.connect_timeout_s) +
                            " s (can " + rails_[0]->domain_name() + " reach " + a.rails[0].domain +
                            " with provider " + provider_ + "?)";
  }
  if (!error.empty()) {
    disconnect(c);
    fail(ErrorCode::kTransport, "fabric session with peer failed: " + error);
  }
  c.tag = result.tag;
  return c;
}

void FabricCore::disconnect(const Connection& c) {
  if (stopping_) return;
  for (size_t i = 0; i < c.dest.size() && i < rails_.size(); ++i) {
    for (fi_addr_t a : c.dest[i]) rails_[i]->remove(a);
  }
}

void FabricCore::send_owned(size_t rail, OwnedSend* s) {
  s->rail = rails_[rail].get();
  {
    std::lock_guard<std::mutex> lock(mu_);
    owned_.insert(s);
  }
  rails_[rail]->submit({s});
}

void FabricCore::finish_owned(OwnedSend* s, const std::string& error) {
  if (s->hello) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = hellos_.find(s->token);
    if (it != hellos_.end() && !error.empty() && !it->second.done) {
      it->second.done = true;
      it->second.error = "sending the hello failed: " + error;
    }
  }
  if (s->forget_dest && !stopping_) s->rail->remove(s->dest);
  {
    std::lock_guard<std::mutex> lock(mu_);
    owned_.erase(s);
  }
  cv_.notify_all();
  delete s;
}

void FabricCore::handle_hello(Rail& rail, const Msg& m) {
  SessionTable::Hello h = sessions_.hello(m.token);
  auto* s = new OwnedSend;
  Msg ack;
  ack.type = MsgType::kHelloAck;
  ack.token = m.token;
  ack.tag = h.tag;
  ack.reply_to = h.refusal;
  try {
    s->dest = rail.insert(m.reply_to);
  } catch (const Error& e) {
    delete s;
    ctx_.sink.on_link_failed(0, Error(ErrorCode::kTransport,
                                      std::string("fabric hello from an unusable address: ") + e.what()));
    return;
  }
  if (h.tag != 0 && h.fresh) {
    sessions_.set_reply_addr(h.tag, s->dest);
  } else {
    s->forget_dest = true;  // refused, or a repeat: this insertion is only for the answer
  }
  s->bytes = encode_msg(ack);
  send_owned(rail.index(), s);
}

// ---------------------------------------------------------------- transfers

void FabricCore::post_batch(std::unique_ptr<Batch> batch) {
  Batch* b = batch.get();
  const bool write = b->kind == OpKind::kWrite;
  b->pending = static_cast<uint32_t>(b->units.size()) + (write ? 1 : 0);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) batches_[b] = std::move(batch);
  }
  if (batch) {  // not taken: shutting down
    ctx_.sink.on_op_failed(b->slot, Error(ErrorCode::kTransport, "fabric transport is shut down"));
    return;
  }
  std::vector<std::vector<OpCtx*>> per_rail(rails_.size());
  if (write) per_rail[0].push_back(&b->map);  // the MAP first, though nothing relies on it
  for (auto& u : b->units) per_rail[u.rail].push_back(&u);
  for (size_t r = 0; r < rails_.size(); ++r) {
    if (!per_rail[r].empty()) rails_[r]->submit(per_rail[r]);
  }
}

void FabricCore::finish(Batch* b) {
  if (b->pending.fetch_sub(1) != 1) return;
  std::unique_ptr<Batch> done;  // destroyed outside the lock (drops the region hold)
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = batches_.find(b);
    if (it != batches_.end()) {
      done = std::move(it->second);
      batches_.erase(it);
    }
  }
  cv_.notify_all();
}

bool FabricCore::cancel_link(uint64_t link, double wait_s) {
  auto mine = [&] {
    for (const auto& [b, _] : batches_) {
      if (b->link == link) return true;
    }
    return false;
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [b, _] : batches_) {
      if (b->link == link) b->cancelled = true;
    }
  }
  for (auto& r : rails_) r->kick();  // drop what is still queued
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(wait_s),
                      [&] { return !mine() || stopping_.load(); }) && !stopping_.load();
}

// ---------------------------------------------------------------- completion upcalls

void FabricCore::on_done(Rail&, OpCtx* op) {
  if (op->batch == nullptr) {
    finish_owned(static_cast<OwnedSend*>(op), "");
    return;
  }
  Batch* b = op->batch;
  if (op->kind == CtxKind::kRead && !b->cancelled && !b->failed) ctx_.sink.on_read_landed(b->slot, 1);
  finish(b);
}

void FabricCore::on_failed(Rail& rail, OpCtx* op, int err, const std::string& why) {
  if (op->batch == nullptr) {
    finish_owned(static_cast<OwnedSend*>(op), why);
    return;
  }
  Batch* b = op->batch;
  if (!b->cancelled && !b->failed.exchange(true)) {
    std::string what = op->kind == CtxKind::kSend ? "announcing a fabric write" : op_name(*b);
    Error e(ErrorCode::kTransport,
            what + " failed on " + provider_ + " (" + rail.domain_name() + "): " + why);
    ctx_.sink.on_op_failed(b->slot, e);
    // The peer itself is unreachable, not just this operation refused (a bad key, a region
    // gone): fail the whole peer now rather than when its control connection notices.
    if (peer_unreachable(err)) ctx_.sink.on_link_failed(b->peer, e);
  }
  finish(b);
}

void FabricCore::on_skipped(Rail&, OpCtx* op) {
  if (op->batch == nullptr) {
    finish_owned(static_cast<OwnedSend*>(op), "the transport is shutting down");
    return;
  }
  finish(op->batch);
}

void FabricCore::on_message(Rail& rail, const void* data, size_t len) {
  Msg m;
  try {
    m = decode_msg(data, len);
  } catch (const Error& e) {
    ctx_.sink.on_link_failed(0, Error(ErrorCode::kProtocol, std::string("fabric ") + e.what()));
    return;
  }
  switch (m.type) {
    case MsgType::kHello:
      handle_hello(rail, m);
      break;
    case MsgType::kHelloAck: {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = hellos_.find(m.token);
      if (it != hellos_.end() && !it->second.done) {
        it->second.done = true;
        it->second.tag = m.tag;
        if (m.tag == 0) it->second.error = "the peer refused: " + m.reply_to;
      }
      cv_.notify_all();
      break;
    }
    case MsgType::kMap:
      if (auto a = sessions_.map(m.tag, m.seq, m.units, m.slot)) {
        ctx_.sink.on_arrival(a->peer, a->slot, a->units);
      }
      break;
  }
}

void FabricCore::on_remote_write(Rail&, uint64_t imm) {
  if (auto a = sessions_.arrive(static_cast<uint32_t>(imm))) {
    ctx_.sink.on_arrival(a->peer, a->slot, a->units);
  }
}

void FabricCore::on_async_error(Rail& rail, const std::string& why) {
  if (stopping_) return;
  ctx_.sink.on_link_failed(0, Error(ErrorCode::kTransport, "fabric " + rail.describe() + ": " + why));
}

void FabricCore::on_idle(Rail& rail) {
  if (rail.index() != 0) return;
  double age = std::max(60.0, 4 * ctx_.options.connect_timeout_s);
  sessions_.sweep(std::chrono::duration_cast<SessionTable::Clock::duration>(
      std::chrono::duration<double>(age)));
}

// ---------------------------------------------------------------- shutdown

void FabricCore::shutdown() {
  if (stopping_.exchange(true)) return;
  if (const char* d = std::getenv("KVTRANSFER_FABRIC_DEBUG"); d && *d && *d != '0') {
    std::lock_guard<std::mutex> lock(mu_);
    std::fprintf(stderr, "kvtransfer fabric %s at shutdown: %zu transfers in flight; %s\n",
                 provider_.c_str(), batches_.size(), sessions_.debug_state().c_str());
    for (auto& r : rails_) std::fprintf(stderr, "  rail %s\n", r->debug_state().c_str());
  }
  cv_.notify_all();
  // Endpoints first: once closed, the provider touches none of our memory or contexts.
  bool stuck = false;
  for (auto& r : rails_) {
    r->stop();
    stuck = stuck || r->abandoned();
  }
  std::unordered_map<Batch*, std::unique_ptr<Batch>> batches;
  std::set<OwnedSend*> owned;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batches.swap(batches_);
    owned.swap(owned_);
  }
  if (stuck) {  // a thread may still be inside the provider with our contexts: leak them
    for (auto& [_, b] : batches) (void)b.release();
    return;
  }
  if (mrs_) mrs_->close_all();
  for (OwnedSend* s : owned) delete s;
  batches.clear();
  for (auto& r : rails_) r->close();
}

}  // namespace kvt::fabric
