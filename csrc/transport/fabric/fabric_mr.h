// Memory registration, honouring whatever mr_mode each rail's provider asked for:
//   FI_MR_LOCAL      local buffers need a descriptor too: every region is registered, and its
//                    fi_mr_desc() goes with each iovec; without it only regions peers may
//                    access are registered (a local-only source region costs nothing).
//   FI_MR_VIRT_ADDR  remote addresses are the owner's virtual addresses, else offsets from the
//                    region's start; the remote key bytes carry the base to add.
//   FI_MR_PROV_KEY   the provider picks the key; otherwise we ask for the region's own random
//                    key (cut to mr_key_size bytes), so keys are not guessable.
//   FI_MR_ALLOCATED  only allocated memory: all a Region can be.
//   FI_MR_ENDPOINT   each registration is bound to the rail's endpoint and enabled.
//   FI_MR_HMEM       device memory (found with the CUDA driver's cuPointerGetAttribute when it
//                    is loaded) is registered with its iface and device, on rails with FI_HMEM.
// Registration happens only on this endpoint's rails (the NICs it was given), never on every
// NIC of the host.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/region_registry.h"
#include "transport/fabric/fabric_api.h"
#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {

class Rail;

// Registers [base, base+len) on one rail; throws TransportError / InvalidRequest.
fid_mr* register_memory(Rail& rail, void* base, size_t len, uint64_t access, uint64_t key_hint);

class MrTable {
 public:
  explicit MrTable(std::vector<Rail*> rails) : rails_(std::move(rails)) {}
  ~MrTable() { close_all(); }
  // Returns the remote key bytes (empty when the region is not remotely accessible).
  std::string add(const Region& region);
  void remove(uint32_t region_id);
  // Local descriptors of a region, one per rail (nullptr where the provider needs none).
  std::vector<void*> descriptors(uint32_t region_id) const;
  void close_all();

 private:
  struct Entry {
    std::vector<fid_mr*> mrs;  // per rail, nullptr where not registered
  };
  std::vector<Rail*> rails_;
  mutable std::mutex mu_;
  std::map<uint32_t, Entry> entries_;
};

}  // namespace kvt::fabric
