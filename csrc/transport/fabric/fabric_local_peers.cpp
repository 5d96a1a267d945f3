#include "transport/fabric/fabric_local_peers.h"

namespace kvt::fabric {

namespace {

template <class Fid>
void close_fid(Fid*& obj) {
  if (obj) fi_close(&obj->fid);
  obj = nullptr;
}

}  // namespace

// Endpoint first (it holds references on the AV and CQ), then what it was bound to.
void RailObjects::close() {
  close_fid(ep);
  close_fid(arena_mr);
  close_fid(av);
  close_fid(cq);
  close_fid(domain);
  close_fid(fabric);
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
