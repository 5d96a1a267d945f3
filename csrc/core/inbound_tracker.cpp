#include "core/inbound_tracker.h"

namespace kvt {
namespace {

constexpr auto kRememberFailed = std::chrono::seconds(120);

Clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

}  // namespace

std::optional<InboundOutcome> InboundTracker::begin(uint64_t peer, const std::string& peer_name,
                                                    const wire::Begin& m,
                                                    Clock::time_point deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  Key k{peer, m.slot};
  if (auto f = failed_.find(k); f != failed_.end()) {
    if (f->second.reported) return std::nullopt;
    f->second.reported = true;  // failed before it began: report it now, with its payload
    InboundOutcome o;
    o.peer = peer;
    o.slot = m.slot;
    o.has_notify = m.has_notify;
    o.payload = m.notify;
    o.peer_name = peer_name;
    o.code = f->second.code;
    o.error = f->second.reason;
    return o;
  }
  auto [it, fresh] = live_.try_emplace(k);
  Entry& e = it->second;
  if (e.begun) {
    return fail_locked(it, ErrorCode::kProtocol, "transfer began twice");
  }
  e.begun = true;
  e.expected = m.units;
  e.has_notify = m.has_notify;
  e.payload = m.notify;
  e.peer_name = peer_name;
  e.deadline = deadline;
  for (const auto& [prefix, until_why] : refused_) {
    if (m.notify.compare(0, prefix.size(), prefix) == 0) {
      return fail_locked(it, ErrorCode::kTransport, until_why.second);
    }
  }
  if (deadline <= Clock::now()) {
    return fail_locked(it, ErrorCode::kTimeout, "deadline passed before the transfer began here");
  }
  return settle_locked(k);
}

std::optional<InboundOutcome> InboundTracker::arrive(uint64_t peer, uint64_t slot, uint32_t units) {
  std::lock_guard<std::mutex> lock(mu_);
  Key k{peer, slot};
  if (failed_.count(k)) return std::nullopt;  // late data never revives a failed transfer
  auto [it, fresh] = live_.try_emplace(k);
  if (fresh) it->second.deadline = Clock::now() + seconds(default_timeout_s_);
  it->second.arrived += units;
  return settle_locked(k);
}

std::optional<InboundOutcome> InboundTracker::settle_locked(const Key& k) {
  auto it = live_.find(k);
  Entry& e = it->second;
  if (!e.begun || e.arrived < e.expected) return std::nullopt;
  if (e.arrived > e.expected) {
    return fail_locked(it, ErrorCode::kProtocol,
                       "received " + std::to_string(e.arrived) + " units for a transfer of " +
                           std::to_string(e.expected));
  }
  InboundOutcome o;
  o.peer = k.first;
  o.slot = k.second;
  o.ok = true;
  o.has_notify = e.has_notify;
  o.payload = std::move(e.payload);
  o.peer_name = std::move(e.peer_name);
  live_.erase(it);
  return o;
}

InboundOutcome InboundTracker::fail_locked(std::map<Key, Entry>::iterator it, ErrorCode code,
                                           std::string error) {
  InboundOutcome o;
  o.peer = it->first.first;
  o.slot = it->first.second;
  o.ok = false;
  o.has_notify = it->second.has_notify;
  o.payload = std::move(it->second.payload);
  o.peer_name = std::move(it->second.peer_name);
  o.code = code;
  o.error = std::move(error);
  failed_[it->first] = Failed{Clock::now() + kRememberFailed, it->second.begun, code, o.error};
  live_.erase(it);
  return o;
}

std::optional<InboundOutcome> InboundTracker::abort(uint64_t peer, uint64_t slot, ErrorCode code,
                                                    const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = live_.find({peer, slot});
  if (it == live_.end()) {  // nothing of it here yet: fail it when its BEGIN arrives
    failed_.try_emplace({peer, slot}, Failed{Clock::now() + kRememberFailed, false, code, reason});
    return std::nullopt;
  }
  if (!it->second.begun) {  // units arrived, BEGIN not yet: it reports when the BEGIN comes
    failed_[it->first] = Failed{Clock::now() + kRememberFailed, false, code, reason};
    live_.erase(it);
    return std::nullopt;
  }
  return fail_locked(it, code, reason);
}

std::vector<InboundOutcome> InboundTracker::fail_peer(uint64_t peer, const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<InboundOutcome> out;
  for (auto it = live_.begin(); it != live_.end();) {
    auto next = std::next(it);
    if (it->first.first == peer) out.push_back(fail_locked(it, ErrorCode::kTransport, reason));
    it = next;
  }
  return out;
}

std::vector<InboundOutcome> InboundTracker::expire(Clock::time_point now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<InboundOutcome> out;
  for (auto it = live_.begin(); it != live_.end();) {
    auto next = std::next(it);
    if (it->second.deadline <= now) {
      out.push_back(fail_locked(it, ErrorCode::kTimeout,
                                "deadline passed with " + std::to_string(it->second.arrived) +
                                    " of " + (it->second.begun ? std::to_string(it->second.expected) : std::string("?")) +
                                    " units received"));
    }
    it = next;
  }
  for (auto it = failed_.begin(); it != failed_.end();) {
    it = it->second.forget_at <= now ? failed_.erase(it) : std::next(it);
  }
  for (auto it = refused_.begin(); it != refused_.end();) {
    it = it->second.first <= now ? refused_.erase(it) : std::next(it);
  }
  return out;
}

bool InboundTracker::accepts(uint64_t peer, uint64_t slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_.count({peer, slot}) == 0;
}

std::vector<InboundOutcome> InboundTracker::refuse_prefix(const std::string& prefix,
                                                          const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  refused_[prefix] = {Clock::now() + kRememberFailed, reason};
  std::vector<InboundOutcome> out;
  for (auto it = live_.begin(); it != live_.end();) {
    auto next = std::next(it);
    if (it->second.begun && it->second.payload.compare(0, prefix.size(), prefix) == 0) {
      out.push_back(fail_locked(it, ErrorCode::kTransport, reason));
    }
    it = next;
  }
  return out;
}

size_t InboundTracker::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_.size();
}

}  // namespace kvt
