#include "core/region_registry.h"

#include <chrono>
#include <cstring>
#include <thread>

#include "auth/hmac_sha256.h"
#include "core/error.h"

namespace kvt {

std::shared_ptr<const Region> RegionRegistry::add(char* base, uint64_t nbytes, bool remote_write,
                                                  bool remote_read) {
  if (base == nullptr && nbytes > 0) {
    fail(ErrorCode::kInvalidRequest, "cannot register a null address with " +
                                         std::to_string(nbytes) + " bytes");
  }
  auto r = std::make_shared<Region>();
  std::string kb = auth::random_bytes(8);
  std::memcpy(&r->key, kb.data(), 8);
  r->base = base;
  r->nbytes = nbytes;
  r->remote_write = remote_write;
  r->remote_read = remote_read;
  std::lock_guard<std::mutex> lock(mu_);
  r->id = next_id_++;
  regions_[r->id] = r;
  return r;
}

void RegionRegistry::remove(uint32_t id, double timeout_s) {
  std::shared_ptr<Region> r;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = regions_.find(id);
    if (it == regions_.end()) return;  // closing twice is harmless
    r = std::move(it->second);
    regions_.erase(it);
  }
  // Transfers in flight hold references; wait for them to drain. Polling is fine here: it only
  // runs while a region is being deregistered, never on the data path.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (r.use_count() > 1) {
    if (std::chrono::steady_clock::now() > deadline) {
      fail(ErrorCode::kTimeout,
           "region " + std::to_string(id) + " is still used by " +
               std::to_string(r.use_count() - 1) + " transfer(s) in flight after " +
               std::to_string(timeout_s) + " s; it no longer accepts new ones. Wait for them "
               "or close the endpoint");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

std::shared_ptr<const Region> RegionRegistry::lookup(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end()) {
    fail(ErrorCode::kInvalidRequest, "local region " + std::to_string(id) +
                                         " is not registered (closed already?)");
  }
  return it->second;
}

std::shared_ptr<const Region> RegionRegistry::check(uint32_t id, uint64_t key, Access access) const {
  auto r = find(id);
  if (!r) fail(ErrorCode::kProtocol, "remote access to unknown or deregistered region " + std::to_string(id));
  check_access(*r, key, access);
  return r;
}

std::shared_ptr<const Region> RegionRegistry::find(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  return it == regions_.end() ? nullptr : it->second;
}

void RegionRegistry::check_access(const Region& r, uint64_t key, Access access) {
  const std::string id = std::to_string(r.id);
  if (r.key != key) fail(ErrorCode::kProtocol, "remote access to region " + id + " with a wrong key");
  if (access == Access::kRemoteWrite && !r.remote_write) {
    fail(ErrorCode::kProtocol, "remote write to region " + id + ", which is not registered with remote_write=True");
  }
  if (access == Access::kRemoteRead && !r.remote_read) {
    fail(ErrorCode::kProtocol, "remote read of region " + id + ", which is not registered with remote_read=True");
  }
}

void RegionRegistry::publish(uint32_t id, std::string rkey) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = regions_.find(id);
  if (it == regions_.end()) return;
  it->second->rkey = std::move(rkey);
  it->second->published = true;
}

std::vector<RemoteRegion> RegionRegistry::exposed() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<RemoteRegion> out;
  for (const auto& [id, r] : regions_) {
    if (!r->published || (!r->remote_write && !r->remote_read)) continue;
    out.push_back(RemoteRegion{id, r->key, r->nbytes, reinterpret_cast<uint64_t>(r->base),
                               r->remote_write, r->remote_read, r->rkey});
  }
  return out;
}

}  // namespace kvt
