#include "transport/fabric/fabric_mr.h"

#include <dlfcn.h>

#include <cstring>
#include <random>

#include "core/error.h"
#include "transport/fabric/fabric_rail.h"

namespace kvt::fabric {
namespace {

struct MemoryKind {
  enum fi_hmem_iface iface = FI_HMEM_SYSTEM;
  uint64_t device = 0;
};

// CUDA driver API, only when the process already loaded it (never loads it ourselves).
MemoryKind memory_kind(const void* p) {
  using GetAttr = int (*)(void*, int, unsigned long long);
  static GetAttr get = [] {
    void* h = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    return h ? reinterpret_cast<GetAttr>(::dlsym(h, "cuPointerGetAttribute")) : nullptr;
  }();
  MemoryKind k;
  if (!get) return k;
  constexpr int kMemoryType = 2, kDeviceOrdinal = 9, kDevice = 2;  // CU_POINTER_ATTRIBUTE_*
  unsigned int type = 0;
  auto addr = static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p));
  if (get(&type, kMemoryType, addr) != 0 || type != kDevice) return k;
  int ordinal = 0;
  get(&ordinal, kDeviceOrdinal, addr);
  k.iface = FI_HMEM_CUDA;
  k.device = static_cast<uint64_t>(ordinal);
  return k;
}

uint64_t key_mask(size_t key_size) {
  return key_size >= 8 ? ~0ull : ((1ull << (8 * key_size)) - 1);
}

}  // namespace

fid_mr* register_memory(Rail& rail, void* base, size_t len, uint64_t access, uint64_t key_hint) {
  const RailLimits& lim = rail.limits();
  MemoryKind kind = memory_kind(base);
  if (kind.iface != FI_HMEM_SYSTEM && !lim.hmem) {
    fail(ErrorCode::kInvalidRequest,
         "device memory cannot be registered on " + rail.describe() +
             ": the provider offers no FI_HMEM here (set KVTRANSFER_FABRIC_HMEM=1 and check "
             "`kvtransfer doctor`)");
  }
  struct iovec iov{base, len};
  struct fi_mr_attr attr{};
  attr.mr_iov = &iov;
  attr.iov_count = 1;
  attr.access = access;
  attr.iface = kind.iface;
  if (kind.iface == FI_HMEM_CUDA) attr.device.cuda = static_cast<int>(kind.device);
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  uint64_t key = key_hint & key_mask(lim.mr_key_size);
  fid_mr* mr = nullptr;
  int rc = 0;
  for (int attempt = 0; attempt < 8; ++attempt) {
    attr.requested_key = (lim.mr_mode & FI_MR_PROV_KEY) ? 0 : key;
    rc = fi_mr_regattr(rail.domain(), &attr, 0, &mr);
    if (rc != -FI_ENOKEY) break;
    key = rng() & key_mask(lim.mr_key_size);  // taken already on this domain: another one
  }
  if (rc != 0) {
    fail(ErrorCode::kTransport, "registering " + std::to_string(len) + " bytes on " +
                                    rail.describe() + " failed: " + fi_strerror(-rc));
  }
  if (lim.mr_mode & FI_MR_ENDPOINT) {
    rc = fi_mr_bind(mr, &rail.ep()->fid, 0);
    if (rc == 0) rc = fi_mr_enable(mr);
    if (rc != 0) {
      fi_close(&mr->fid);
      fail(ErrorCode::kTransport, "binding a registration to the endpoint on " + rail.describe() +
                                      " failed: " + fi_strerror(-rc));
    }
  }
  return mr;
}

std::string MrTable::add(const Region& region) {
  const bool remote = region.remote_write || region.remote_read;
  Entry e;
  std::vector<RailKey> keys;
  try {
    for (Rail* rail : rails_) {
      const RailLimits& lim = rail->limits();
      const bool device = memory_kind(region.base).iface != FI_HMEM_SYSTEM;
      const bool needed = remote || (lim.mr_mode & FI_MR_LOCAL) || (device && (lim.mr_mode & FI_MR_HMEM));
      if (!needed || region.nbytes == 0) {
        e.mrs.push_back(nullptr);
        keys.push_back(RailKey{});
        continue;
      }
      uint64_t access = FI_READ | FI_WRITE;
      if (region.remote_write) access |= FI_REMOTE_WRITE;
      if (region.remote_read) access |= FI_REMOTE_READ;
      fid_mr* mr = register_memory(*rail, region.base, region.nbytes, access, region.key);
      e.mrs.push_back(mr);
      RailKey k;
      k.key = fi_mr_key(mr);
      k.base = (lim.mr_mode & FI_MR_VIRT_ADDR) ? reinterpret_cast<uint64_t>(region.base) : 0;
      keys.push_back(k);
    }
  } catch (...) {
    for (fid_mr* mr : e.mrs) {
      if (mr) fi_close(&mr->fid);
    }
    throw;
  }
  std::lock_guard<std::mutex> lock(mu_);
  entries_[region.id] = std::move(e);
  return remote ? encode_rkey(keys) : std::string();
}

void MrTable::remove(uint32_t region_id) {
  Entry e;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(region_id);
    if (it == entries_.end()) return;
    e = std::move(it->second);
    entries_.erase(it);
  }
  for (fid_mr* mr : e.mrs) {
    if (mr) fi_close(&mr->fid);
  }
}

std::vector<void*> MrTable::descriptors(uint32_t region_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<void*> out(rails_.size(), nullptr);
  auto it = entries_.find(region_id);
  if (it == entries_.end()) return out;
  for (size_t i = 0; i < rails_.size() && i < it->second.mrs.size(); ++i) {
    if (it->second.mrs[i]) out[i] = fi_mr_desc(it->second.mrs[i]);
  }
  return out;
}

void MrTable::close_all() {
  std::map<uint32_t, Entry> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    all.swap(entries_);
  }
  for (auto& [_, e] : all) {
    for (fid_mr* mr : e.mrs) {
      if (mr) fi_close(&mr->fid);
    }
  }
}

}  // namespace kvt::fabric
