#include "transport/fabric/fabric_local_peers.h"

namespace kvt::fabric {

// Endpoint first (it holds references on the AV and CQ), then what it was bound to.
void RailObjects::close() {
  if (ep) fi_close(&ep->fid);
  ep = nullptr;
  if (arena_mr) fi_close(&arena_mr->fid);
  arena_mr = nullptr;
  if (av) fi_close(&av->fid);
  av = nullptr;
  if (cq) fi_close(&cq->fid);
  cq = nullptr;
  if (domain) fi_close(&domain->fid);
  domain = nullptr;
  if (fabric) fi_close(&fabric->fid);
  fabric = nullptr;
}

LocalPeers& LocalPeers::instance() {
  static LocalPeers* peers = new LocalPeers();  // never destroyed: rails may close at exit
  return *peers;
}

void LocalPeers::opened(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  entries_[address];
}

void LocalPeers::inserted(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(address);
  if (it != entries_.end()) it->second.holders++;
}

std::unique_ptr<RailObjects> LocalPeers::removed(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(address);
  if (it == entries_.end() || it->second.holders == 0) return nullptr;
  if (--it->second.holders > 0 || !it->second.parked) return nullptr;
  auto objects = std::move(it->second.parked);
  entries_.erase(it);
  return objects;
}

bool LocalPeers::parked(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(address);
  return it != entries_.end() && it->second.parked != nullptr;
}

std::unique_ptr<RailObjects> LocalPeers::retire(const std::string& address,
                                                std::unique_ptr<RailObjects> objects) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(address);
  if (it == entries_.end() || it->second.holders == 0) {
    if (it != entries_.end()) entries_.erase(it);
    return objects;
  }
  it->second.parked = std::move(objects);
  return nullptr;
}

}  // namespace kvt::fabric
