// The target's registered regions, published in shared memory for same-host initiators.
//
// With cross-memory attach the initiator writes straight into the target's pages, so the
// target cannot check a unit before it lands. Instead it publishes what a peer may touch in a
// table (a sealed memfd mapped read-only by initiators), and every initiator session gets a
// busy board (a memfd both sides map) with one in-flight counter per table slot.
//
// An access, at the initiator (RegionTableView::acquire):
//   seq = entry.seq (odd: live); check id, key, permission and bounds against the entry;
//   busy[slot]++; re-read entry.seq: unchanged -> copy, then busy[slot]--; changed -> refused.
// Deregistration, at the target (RegionTable::withdraw + BusyBoard::wait_idle):
//   entry.seq++ (even: withdrawn); wait until busy[slot] == 0 on every live session.
// Both sides order their store before their load (sequentially consistent), so either the
// initiator sees the withdrawal and refuses, or the target sees the counter and waits for it:
// once deregistration returns, no initiator copies into that region. A session whose socket
// the initiator closed (or whose process died) copies nothing more, so its counters no longer
// hold deregistration up.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/region_registry.h"
#include "transport/cma/cma_arrival_ring.h"

namespace kvt::cma {

constexpr uint32_t kTableCapacity = 16384;  // regions exposed at once by one endpoint
constexpr uint64_t kTableMagic = 0x31414d435456484bull;
constexpr uint32_t kPermWrite = 1, kPermRead = 2;

struct alignas(64) TableHeader {
  uint64_t magic;
  uint32_t capacity;
  uint32_t reserved;
  uint64_t probe_addr;   // a word in the target's private memory holding probe_value: an
  uint64_t probe_value;  // initiator reads it with process_vm_readv to prove it can attach
};

struct alignas(64) TableEntry {
  uint64_t seq;  // odd: live; each registration and withdrawal adds one
  uint64_t key;
  uint64_t addr;
  uint64_t len;
  uint32_t id;
  uint32_t perms;
};

// A memfd mapped into this process, unmapped and closed on destruction.
class SharedMapping {
 public:
  SharedMapping() = default;
  SharedMapping(int fd, size_t bytes, bool writable);  // takes ownership of fd
  SharedMapping(const SharedMapping&) = delete;
  SharedMapping& operator=(const SharedMapping&) = delete;
  ~SharedMapping();
  static SharedMapping create(const char* name, size_t bytes);
  int fd() const { return fd_; }
  char* data() const { return data_; }
  size_t size() const { return bytes_; }

 private:
  int fd_ = -1;
  char* data_ = nullptr;
  size_t bytes_ = 0;
};

// Target: owns the table.
class RegionTable {
 public:
  RegionTable();
  int fd() const { return shm_.fd(); }
  static size_t bytes();
  // Publishes a region for remote access; returns its slot. Throws when the table is full.
  uint32_t publish(const Region& r);
  // New accesses to `slot` are refused from now on (accesses under way finish: see BusyBoard).
  void withdraw(uint32_t slot);
  // The slot may be reused (no session holds it any more).
  void recycle(uint32_t slot);
  std::vector<uint32_t> live_slots() const;

 private:
  TableEntry& entry(uint32_t slot) const;
  SharedMapping shm_;
  uint64_t probe_word_;
  std::vector<uint32_t> free_;
  std::vector<bool> live_;
};

// One session's in-flight counters, one 32-bit word per table slot (a futex word), followed by
// its arrival ring (cma_arrival_ring.h).
class BusyBoard {
 public:
  BusyBoard() : shm_(SharedMapping::create("kvtransfer-cma-busy", bytes())) {}
  int fd() const { return shm_.fd(); }
  static size_t counter_bytes() { return kTableCapacity * sizeof(uint32_t); }
  static size_t bytes() { return counter_bytes() + ArrivalRing::bytes(); }
  char* ring_area() const { return shm_.data() + counter_bytes(); }
  // Blocks (futex, in slices) until no access to `slot` is under way, or `gone` is set (the
  // session ended), or the deadline passes: false then.
  bool wait_idle(uint32_t slot, std::chrono::steady_clock::time_point deadline,
                 const std::atomic<bool>& gone) const;
  uint32_t in_flight(uint32_t slot) const;

 private:
  SharedMapping shm_;
};

// An access granted by RegionTableView::acquire; give it back with release().
struct Grant {
  uint32_t slot = 0;
  uint64_t seq = 0;
  uint64_t addr = 0;  // the region's base in the target's address space
};

// Initiator: the target's table and this session's busy board, as mapped here.
class RegionTableView {
 public:
  RegionTableView(int table_fd, int busy_fd);  // takes ownership of both
  const TableHeader& header() const;
  // Checks `remote` (id, key, rkey slot), the access and [0, extent) against the live table and
  // marks the access in flight. Throws InvalidRequest when the region is not registered any
  // more, Protocol for a wrong key, a missing permission or bounds beyond the region.
  Grant acquire(const RemoteRegion& remote, bool write, uint64_t extent);
  void release(const Grant& g);
  // The session's arrival ring, or null when the target's board has none (an older target).
  char* ring_area() const;

 private:
  const TableEntry& entry(uint32_t slot) const;
  uint32_t* busy(uint32_t slot) const;
  SharedMapping table_;
  SharedMapping busy_;
};

// The slot a region's rkey names (4 bytes, little-endian), or UINT32_MAX when malformed.
std::string encode_slot(uint32_t slot);
uint32_t decode_slot(const std::string& rkey);

}  // namespace kvt::cma
