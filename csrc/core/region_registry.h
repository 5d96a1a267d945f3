// Registered memory: what a remote peer may touch, with which key, within which bounds.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvt {

struct Region {
  uint32_t id = 0;
  uint64_t key = 0;  // random; a remote access must present it
  char* base = nullptr;
  uint64_t nbytes = 0;
  bool remote_write = false;
  bool remote_read = false;
  std::string rkey;  // transport-specific remote key bytes (empty for TCP)
  // Set once the transport has prepared it for remote access: only then is it listed to peers,
  // so no peer learns of a region a transport (cma's table, fabric's MRs) does not hold yet.
  bool published = false;
};

// What a peer advertises about one of its regions.
struct RemoteRegion {
  uint32_t id = 0;
  uint64_t key = 0;
  uint64_t nbytes = 0;
  uint64_t base = 0;  // the owner's virtual address (for transports that address by it)
  bool remote_write = false;
  bool remote_read = false;
  std::string rkey;
};

enum class Access { kLocal, kRemoteWrite, kRemoteRead };

class RegionRegistry {
 public:
  std::shared_ptr<const Region> add(char* base, uint64_t nbytes, bool remote_write, bool remote_read);
  // Removes the region so no new access can start, then waits for accesses in flight (each
  // holds a shared_ptr) to finish. Throws Timeout, leaving it removed, if they do not.
  void remove(uint32_t id, double timeout_s);
  // Looks a region up for an access: throws InvalidRequest (local) or Protocol (remote) when the
  // id is unknown, the key is wrong or [off, off+len) is outside it. The returned pointer keeps
  // the region alive for the duration of the access.
  std::shared_ptr<const Region> lookup(uint32_t id) const;
  std::shared_ptr<const Region> check(uint32_t id, uint64_t key, Access access) const;
  // Null when the id is unknown: never registered, or deregistered meanwhile. One look-up, so a
  // caller that tells "gone" from "forbidden" does not race a concurrent remove().
  std::shared_ptr<const Region> find(uint32_t id) const;
  // Throws Protocol when `key` or the access rights do not match the region.
  static void check_access(const Region& r, uint64_t key, Access access);
  // Records the transport's remote key and lists the region to peers from now on.
  void publish(uint32_t id, std::string rkey);
  std::vector<RemoteRegion> exposed() const;  // the regions peers may access

 private:
  mutable std::mutex mu_;
  std::unordered_map<uint32_t, std::shared_ptr<Region>> regions_;
  uint32_t next_id_ = 1;
};

// True when [off, off+len) lies within [0, size) with no overflow.
inline bool in_bounds(uint64_t off, uint64_t len, uint64_t size) {
  return off <= size && len <= size - off;
}

}  // namespace kvt
