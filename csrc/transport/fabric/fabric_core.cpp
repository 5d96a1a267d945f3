#include "transport/fabric/fabric_core.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "transport/fabric/fabric_loader.h"
#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {
namespace {

bool connection_lost(int err) {
  switch (err) {
    case FI_ECONNRESET:
    case FI_ECONNREFUSED:
    case FI_ECONNABORTED:
    case FI_EHOSTUNREACH:
    case FI_ENOTCONN:
    case FI_ESHUTDOWN:
    case FI_ETIMEDOUT:
    case EPIPE:
      return true;
    default:
      return false;
  }
}

// The peer itself is gone, not just this operation refused. We never cancel, so FI_ECANCELED
// means the provider tore a connection down: ofi_rxm says why in prov_errno (an errno) -
// ENOTCONN when the peer died, ENOENT when the target refused a key and dropped the link.
bool peer_unreachable(int err, int prov_errno) {
  return connection_lost(err) || (err == FI_ECANCELED && connection_lost(prov_errno));
}

// The target refused the access: its registration is gone (a race with deregistration) or the
// key is wrong - from here the two look the same. FI_EACCES is the RMA answer (verbs, EFA's
// remote access errors); ofi_rxm drops the connection and cancels with ENOENT (key not found).
bool access_refused(int err, int prov_errno) {
  return err == FI_EACCES || (err == FI_ECANCELED && prov_errno == ENOENT);
}

std::string op_name(const Batch& b) {
  return b.kind == OpKind::kWrite ? "fabric write" : "fabric read";
}

}  // namespace

FabricCore::FabricCore(TransportContext ctx) : ctx_(std::move(ctx)), reports_(ctx_.sink) {
  load_library();
  Selection sel = select_rails(parse_provider_spec(ctx_.options.provider), ctx_.options.listen_host);
  provider_ = sel.provider;
  rdma_read_ = sel.rdma_read;
  hmem_ = sel.hmem;
  delivery_complete_ = sel.delivery_complete;
  try {
    for (size_t i = 0; i < sel.rails.size(); ++i) {
      rails_.push_back(std::make_unique<Rail>(static_cast<uint32_t>(i), std::move(sel.rails[i]),
                                              *this, delivery_complete_));
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

// ---------------------------------------------------------------- memory

// The Endpoint removed the region and its holds drained; transfers announced since (refused,
// but possibly already started inside the provider) must finish landing before the
// registration closes and the memory can be freed.
//
// That is not enough on its own: a transfer whose MAP is still on the wire when the region
// leaves the registry is unknown here, and ofi_rxd, told by a closed registration to refuse a
// unit it already started, corrupts its receive state (we saw it write through a stale
// iovec). So each initiator with a session is asked to RETIRE the region: it refuses new
// transfers into it and answers RETIRED once none of its own is in flight (its writes complete
// only when placed: delivery-complete). Only then does the registration close. A peer that
// does not answer within the timeout is given up on (and its session is failing anyway).
void FabricCore::deregister_region(const Region& region) {
  const auto timeout = std::chrono::duration<double>(ctx_.options.connect_timeout_s);
  if (!stopping_ && (region.remote_write || region.remote_read)) {
    auto live = sessions_.live();
    if (!live.empty()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto& waiting = retiring_[region.id];
        for (const auto& s : live) waiting.insert(s.token);
      }
      for (const auto& s : live) {
        auto* o = new OwnedSend;
        o->retire = true;
        o->token = s.token;
        o->region = region.id;
        o->dest = s.reply;
        Msg m;
        m.type = MsgType::kRetire;
        m.token = s.token;
        m.region = region.id;
        o->bytes = encode_msg(m);
        send_owned(0, o);
      }
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait_for(lock, timeout, [&] { return retiring_[region.id].empty() || stopping_.load(); });
      retiring_.erase(region.id);
    }
    if (!sessions_.wait_quiet(region.id, timeout)) {
      std::fprintf(stderr, "kvtransfer: fabric: transfers into region %u still had not "
                           "finished after %.1f s; closing its registration anyway\n",
                   region.id, ctx_.options.connect_timeout_s);
    }
  }
  mrs_->remove(region.id);
}

// Initiator: the peer is deregistering a region of its.
void FabricCore::handle_retire(const Msg& m) {
  fi_addr_t to = FI_ADDR_UNSPEC;
  bool now = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = links_.find(m.token);
    if (it == links_.end()) return;  // that link is closed: the peer stops waiting for it
    it->second.retired.insert(m.region);
    to = it->second.target;
    if (in_flight_locked(it->second.id, m.region) > 0) {
      owed_.push_back(OwedRetired{it->second.id, m.token, m.region, to});
      now = false;
    }
  }
  if (now) send_retired(m.token, m.region, to);
}

size_t FabricCore::in_flight_locked(uint64_t link, uint32_t region) const {
  size_t n = 0;
  for (const auto& [b, _] : batches_) n += b->link == link && b->region == region;
  return n;
}

void FabricCore::send_retired(uint64_t token, uint32_t region, fi_addr_t to) {
  if (stopping_) return;
  auto* o = new OwnedSend;
  o->dest = to;
  Msg m;
  m.type = MsgType::kRetired;
  m.token = token;
  m.region = region;
  o->bytes = encode_msg(m);
  send_owned(0, o);
}

void FabricCore::add_link(uint64_t link, const Connection& c) {
  std::lock_guard<std::mutex> lock(mu_);
  links_[c.token] = LinkInfo{link, c.dest.empty() ? FI_ADDR_UNSPEC : c.dest[0][0], {}};
}

void FabricCore::remove_link(uint64_t link) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = links_.begin(); it != links_.end();) {
    it = it->second.id == link ? links_.erase(it) : std::next(it);
  }
  owed_.erase(std::remove_if(owed_.begin(), owed_.end(),
                             [&](const OwedRetired& o) { return o.link == link; }),
              owed_.end());
}

bool FabricCore::region_retired(uint64_t link, uint32_t region) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [_, l] : links_) {
    if (l.id == link) return l.retired.count(region) != 0;
  }
  return false;
}

// ---------------------------------------------------------------- sessions

void FabricCore::end_session(uint64_t peer) {
  auto gone = sessions_.end(peer);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [_, waiting] : retiring_) {
      for (const auto& s : gone) waiting.erase(s.token);  // a gone initiator sends nothing
    }
  }
  cv_.notify_all();
  for (const auto& s : gone) {
    if (!stopping_) rails_[0]->remove(s.reply);
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
  c.token = token;
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
  if (s->retire && !error.empty()) {  // the initiator cannot be told: stop waiting for it
    std::lock_guard<std::mutex> lock(mu_);
    auto it = retiring_.find(s->region);
    if (it != retiring_.end()) it->second.erase(s->token);
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

// The Region a peer's transfer touches, for as long as it does; deregistration waits for it.
std::shared_ptr<const Region> FabricCore::hold_region(uint32_t id, uint64_t key, Access access) {
  auto region = ctx_.regions.find(id);
  if (!region) {
    fail(ErrorCode::kInvalidRequest,
         "region " + std::to_string(id) + " was deregistered while the transfer was in flight");
  }
  RegionRegistry::check_access(*region, key, access);
  return region;
}

// ---------------------------------------------------------------- transfers

void FabricCore::post_batch(std::unique_ptr<Batch> batch) {
  Batch* b = batch.get();
  b->pending = static_cast<uint32_t>(b->units.size()) + 1;  // and its MAP / READ-BEGIN
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopping_) batches_[b] = std::move(batch);
  }
  if (batch) {  // not taken: shutting down
    ctx_.sink.on_op_failed(b->slot, Error(ErrorCode::kTransport, "fabric transport is shut down"));
    return;
  }
  std::vector<std::vector<OpCtx*>> per_rail(rails_.size());
  per_rail[0].push_back(&b->map);  // first, though only ordered providers keep it so
  for (auto& u : b->units) per_rail[u.rail].push_back(&u);
  for (size_t r = 0; r < rails_.size(); ++r) {
    if (!per_rail[r].empty()) rails_[r]->submit(per_rail[r]);
  }
}

void FabricCore::finish(Batch* b) {
  if (b->pending.fetch_sub(1) != 1) return;
  // Every unit is done with the target's memory: let it release the region (a read always;
  // a write whose units did not all land, since the target cannot count it to the end).
  if ((b->kind == OpKind::kRead || b->failed || b->cancelled) && !stopping_) {
    auto* s = new OwnedSend;
    Msg m;
    m.type = MsgType::kRelease;
    m.tag = b->tag;
    m.seq = b->seq;
    s->bytes = encode_msg(m);
    s->dest = b->target;
    send_owned(0, s);
  }
  std::unique_ptr<Batch> done;  // destroyed outside the lock (drops the region hold)
  std::vector<OwedRetired> answer;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = batches_.find(b);
    if (it != batches_.end()) {
      done = std::move(it->second);
      batches_.erase(it);
    }
    for (auto o = owed_.begin(); o != owed_.end();) {
      if (o->link == b->link && o->region == b->region && in_flight_locked(o->link, o->region) == 0) {
        answer.push_back(*o);
        o = owed_.erase(o);
      } else {
        ++o;
      }
    }
  }
  cv_.notify_all();
  for (const auto& o : answer) send_retired(o.token, o.region, o.to);
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

void FabricCore::on_failed(Rail& rail, OpCtx* op, int err, int prov_errno,
                           const std::string& why) {
  if (op->batch == nullptr) {
    finish_owned(static_cast<OwnedSend*>(op), why);
    return;
  }
  Batch* b = op->batch;
  if (!b->cancelled && !b->failed.exchange(true)) {
    std::string what = op->kind == CtxKind::kSend ? "announcing a fabric write" : op_name(*b);
    Error e(ErrorCode::kTransport,
            what + " failed on " + provider_ + " (" + rail.domain_name() + "): " + why);
    if (op->kind != CtxKind::kSend && access_refused(err, prov_errno)) {
      e = Error(ErrorCode::kInvalidRequest,
                "the peer refused the " + op_name(*b) + " (its region was deregistered, or the "
                "key is wrong) on " + provider_ + " (" + rail.domain_name() + "): " + why);
    }
    // The peer itself unreachable (not just this operation refused) fails the whole peer
    // rather than waiting for its control connection to notice.
    const bool lost = peer_unreachable(err, prov_errno);
    if (b->kind == OpKind::kWrite) {
      reports_.add(b->slot, b->peer, e, lost);  // the target may say why: let it first
    } else {
      ctx_.sink.on_op_failed(b->slot, e);
      if (lost) ctx_.sink.on_link_failed(b->peer, e);
    }
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
    case MsgType::kMap: {
      // Hold the region until the transfer is over; refuse it now if that cannot be (a race
      // with deregistration, or a wrong key), rather than let it run into its deadline. The
      // provider refuses the data itself.
      std::shared_ptr<const Region> hold;
      Error refusal(ErrorCode::kInvalidRequest, "");
      try {
        hold = hold_region(m.region, m.key, Access::kRemoteWrite);
      } catch (const Error& e) {
        refusal = e;
      }
      auto a = sessions_.map(m.tag, m.seq, m.units, m.slot, m.region, hold);
      if (!hold) {
        if (auto peer = sessions_.peer_of(m.tag)) ctx_.sink.on_refused(*peer, m.slot, refusal);
        break;
      }
      if (a) ctx_.sink.on_arrival(a->peer, a->slot, a->units);
      break;
    }
    case MsgType::kReadBegin: {
      std::shared_ptr<const Region> hold;
      try {
        hold = hold_region(m.region, m.key, Access::kRemoteRead);
      } catch (const Error&) {
        // Tracked all the same: deregistration waits for it before closing the registration.
      }
      sessions_.read_begin(m.tag, m.seq, m.region, std::move(hold));
      break;
    }
    case MsgType::kRelease:
      sessions_.release(m.tag, m.seq);
      break;
    case MsgType::kRetire:
      handle_retire(m);
      break;
    case MsgType::kRetired: {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = retiring_.find(m.region);
      if (it != retiring_.end()) it->second.erase(m.token);
      cv_.notify_all();
      break;
    }
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
  reports_.stop();
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
