#include "transport/fabric/fabric_session.h"

#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {

void SessionTable::accept(uint64_t peer, uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_[token] = peer;
}

uint32_t SessionTable::allocate_tag_locked() {
  for (uint32_t i = 0; i < kMaxTag; ++i) {
    uint32_t t = next_tag_;
    next_tag_ = next_tag_ == kMaxTag ? 1 : next_tag_ + 1;
    if (sessions_.count(t) == 0) return t;
  }
  return 0;
}

SessionTable::Hello SessionTable::hello(uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  Hello h;
  auto it = tokens_.find(token);
  if (it == tokens_.end()) {
    h.refusal = "unknown or expired session token";
    return h;
  }
  h.peer = it->second;
  if (auto t = by_token_.find(token); t != by_token_.end()) {  // a repeated hello
    h.tag = t->second;
    return h;
  }
  h.tag = allocate_tag_locked();
  if (h.tag == 0) {
    h.refusal = "too many fabric sessions (" + std::to_string(kMaxTag) + ") on this endpoint";
    return h;
  }
  Session s;
  s.peer = h.peer;
  s.token = token;
  sessions_[h.tag] = std::move(s);
  by_token_[token] = h.tag;
  h.fresh = true;
  return h;
}

void SessionTable::set_reply_addr(uint32_t tag, fi_addr_t addr) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(tag);
  if (it != sessions_.end()) it->second.reply = addr;
}

std::optional<uint64_t> SessionTable::peer_of(uint32_t tag) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(tag);
  if (it == sessions_.end()) return std::nullopt;
  return it->second.peer;
}

std::vector<SessionTable::Live> SessionTable::live() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Live> out;
  for (const auto& [_, s] : sessions_) {
    if (s.reply != FI_ADDR_UNSPEC) out.push_back(Live{s.token, s.reply});
  }
  return out;
}

std::vector<SessionTable::Live> SessionTable::end(uint64_t peer) {
  std::vector<Live> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = tokens_.begin(); it != tokens_.end();) {
      it = it->second == peer ? tokens_.erase(it) : std::next(it);
    }
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if (it->second.peer == peer) {
        out.push_back(Live{it->second.token, it->second.reply});
        by_token_.erase(it->second.token);
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }
  changed_.notify_all();
  return out;
}

std::optional<SessionTable::Arrival> SessionTable::map(uint32_t tag, uint32_t seq, uint32_t units,
                                                       uint64_t slot, uint32_t region,
                                                       std::shared_ptr<const Region> hold) {
  std::optional<Arrival> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto s = sessions_.find(tag);
    if (s == sessions_.end()) return std::nullopt;
    auto& pending = s->second.pending;
    Pending& p = pending[seq & kSeqMask];
    if (p.mapped) p = Pending{};  // a stale transfer 2^20 transfers ago that never completed
    if (p.arrived == 0) p.born = Clock::now();
    p.mapped = true;
    p.slot = slot;
    p.units = units;
    p.region = region;
    p.hold = std::move(hold);
    if (p.arrived > 0) out = Arrival{s->second.peer, slot, p.arrived};
    if (p.arrived >= p.units) pending.erase(seq & kSeqMask);
  }
  changed_.notify_all();
  return out;
}

std::optional<SessionTable::Arrival> SessionTable::arrive(uint32_t imm) {
  std::optional<Arrival> out;
  bool finished = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto s = sessions_.find(imm_tag(imm));
    if (s == sessions_.end()) {
      dropped_++;
      return std::nullopt;
    }
    auto& pending = s->second.pending;
    auto it = pending.find(imm_seq(imm));
    if (it == pending.end()) {
      it = pending.emplace(imm_seq(imm), Pending{}).first;
      it->second.born = Clock::now();
    }
    Pending& p = it->second;
    p.arrived++;
    if (!p.mapped) return std::nullopt;
    out = Arrival{s->second.peer, p.slot, 1};
    if (p.arrived >= p.units) {
      pending.erase(it);
      finished = true;
    }
  }
  if (finished) changed_.notify_all();
  return out;
}

void SessionTable::read_begin(uint32_t tag, uint32_t seq, uint32_t region,
                              std::shared_ptr<const Region> hold) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = sessions_.find(tag);
  if (s != sessions_.end()) s->second.reads[seq & kSeqMask] = Read{region, Clock::now(), std::move(hold)};
}

void SessionTable::release(uint32_t tag, uint32_t seq) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto s = sessions_.find(tag);
    if (s == sessions_.end()) return;
    s->second.reads.erase(seq & kSeqMask);
    auto it = s->second.pending.find(seq & kSeqMask);
    if (it != s->second.pending.end() && it->second.mapped) s->second.pending.erase(it);
  }
  changed_.notify_all();
}

bool SessionTable::busy_locked(uint32_t region) const {
  for (const auto& [_, s] : sessions_) {
    for (const auto& [__, p] : s.pending) {
      if (p.mapped && p.region == region) return true;
    }
    for (const auto& [__, r] : s.reads) {
      if (r.region == region) return true;
    }
  }
  return false;
}

bool SessionTable::wait_quiet(uint32_t region, std::chrono::duration<double> timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_for(lock, timeout, [&] { return !busy_locked(region); });
}

void SessionTable::sweep(Clock::duration max_age) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto cutoff = Clock::now() - max_age;
    for (auto& [_, s] : sessions_) {
      for (auto it = s.pending.begin(); it != s.pending.end();) {
        it = it->second.born < cutoff ? s.pending.erase(it) : std::next(it);
      }
      for (auto it = s.reads.begin(); it != s.reads.end();) {
        it = it->second.born < cutoff ? s.reads.erase(it) : std::next(it);
      }
    }
  }
  changed_.notify_all();
}

std::string SessionTable::debug_state() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out = std::to_string(sessions_.size()) + " sessions, " + std::to_string(dropped_) +
                    " units dropped";
  for (const auto& [tag, s] : sessions_) {
    out += "; tag " + std::to_string(tag) + " (peer " + std::to_string(s.peer) + "): " +
           std::to_string(s.pending.size()) + " writes, " + std::to_string(s.reads.size()) +
           " reads open";
    int shown = 0;
    for (const auto& [seq, p] : s.pending) {
      if (shown++ == 4) break;
      out += " [n " + std::to_string(seq) +
             (p.mapped ? " slot " + std::to_string(p.slot) : " unmapped") + " " +
             std::to_string(p.arrived) + "/" + std::to_string(p.units) + "]";
    }
  }
  return out;
}

}  // namespace kvt::fabric
