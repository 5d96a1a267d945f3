#include "transport/cma/cma_region_table.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>

#include "auth/hmac_sha256.h"
#include "core/error.h"

namespace kvt::cma {
namespace {

template <typename T>
T load(const T& v) {
  return __atomic_load_n(&v, __ATOMIC_SEQ_CST);
}
template <typename T>
void store(T& v, T x) {
  __atomic_store_n(&v, x, __ATOMIC_SEQ_CST);
}

uint64_t random_u64() {
  std::string b = auth::random_bytes(8);
  uint64_t v;
  std::memcpy(&v, b.data(), 8);
  return v;
}

[[noreturn]] void sys_fail(const std::string& what) {
  fail(ErrorCode::kTransport, "cma: " + what + " failed: " + std::strerror(errno));
}

}  // namespace

// ---------------------------------------------------------------- SharedMapping

SharedMapping::SharedMapping(int fd, size_t bytes, bool writable) : fd_(fd), bytes_(bytes) {
  void* p = ::mmap(nullptr, bytes, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    ::close(fd);
    fd_ = -1;
    errno = e;
    sys_fail("mapping the shared region table");
  }
  data_ = static_cast<char*>(p);
}

SharedMapping::~SharedMapping() {
  if (data_) ::munmap(data_, bytes_);
  if (fd_ >= 0) ::close(fd_);
}

SharedMapping SharedMapping::create(const char* name, size_t bytes) {
  int fd = static_cast<int>(::syscall(SYS_memfd_create, name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd < 0) sys_fail("memfd_create");
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int e = errno;
    ::close(fd);
    errno = e;
    sys_fail("sizing the shared region table");
  }
  // Its size is fixed: a peer cannot shrink it under our mapping (SIGBUS).
  ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
  return SharedMapping(fd, bytes, true);
}

// ---------------------------------------------------------------- RegionTable

size_t RegionTable::bytes() { return sizeof(TableHeader) + kTableCapacity * sizeof(TableEntry); }

RegionTable::RegionTable()
    : shm_(SharedMapping::create("kvtransfer-cma-table", bytes())),
      probe_word_(random_u64()),
      live_(kTableCapacity, false) {
  auto* h = reinterpret_cast<TableHeader*>(shm_.data());
  h->capacity = kTableCapacity;
  h->probe_addr = reinterpret_cast<uint64_t>(&probe_word_);
  h->probe_value = probe_word_;
  store(h->magic, kTableMagic);
  // Initiators map it read-only; from now on nobody may map it writable again (Linux >= 5.1).
#ifdef F_SEAL_FUTURE_WRITE
  ::fcntl(shm_.fd(), F_ADD_SEALS, F_SEAL_FUTURE_WRITE);
#endif
  free_.reserve(kTableCapacity);
  for (uint32_t s = kTableCapacity; s-- > 0;) free_.push_back(s);
}

TableEntry& RegionTable::entry(uint32_t slot) const {
  return reinterpret_cast<TableEntry*>(shm_.data() + sizeof(TableHeader))[slot];
}

uint32_t RegionTable::publish(const Region& r) {
  if (free_.empty()) {
    fail(ErrorCode::kInvalidRequest,
         "cma: this endpoint already exposes " + std::to_string(kTableCapacity) +
             " regions, the most the cma transport can publish; close some or register fewer, "
             "larger regions");
  }
  uint32_t slot = free_.back();
  free_.pop_back();
  TableEntry& e = entry(slot);
  // The slot is withdrawn (even seq) while its fields change, so no initiator trusts them.
  store(e.key, r.key);
  store(e.addr, reinterpret_cast<uint64_t>(r.base));
  store(e.len, r.nbytes);
  store(e.id, r.id);
  store(e.perms, (r.remote_write ? kPermWrite : 0u) | (r.remote_read ? kPermRead : 0u));
  store(e.seq, load(e.seq) + 1);
  live_[slot] = true;
  return slot;
}

void RegionTable::withdraw(uint32_t slot) {
  if (slot >= kTableCapacity || !live_[slot]) return;
  TableEntry& e = entry(slot);
  store(e.seq, load(e.seq) + 1);
  live_[slot] = false;
}

void RegionTable::recycle(uint32_t slot) {
  if (slot < kTableCapacity && !live_[slot]) free_.push_back(slot);
}

std::vector<uint32_t> RegionTable::live_slots() const {
  std::vector<uint32_t> out;
  for (uint32_t s = 0; s < kTableCapacity; ++s) {
    if (live_[s]) out.push_back(s);
  }
  return out;
}

// ---------------------------------------------------------------- BusyBoard

uint32_t BusyBoard::in_flight(uint32_t slot) const {
  return load(reinterpret_cast<uint32_t*>(shm_.data())[slot]);
}

bool BusyBoard::wait_idle(uint32_t slot, std::chrono::steady_clock::time_point deadline,
                          const std::atomic<bool>& gone) const {
  auto* word = reinterpret_cast<uint32_t*>(shm_.data()) + slot;
  while (true) {
    uint32_t v = load(*word);
    if (v == 0 || gone.load()) return true;
    auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return false;
    // The initiator wakes us when it drops the count to 0; the slice bounds how late we notice
    // a session that ended instead.
    auto slice = std::min<std::chrono::steady_clock::duration>(left, std::chrono::milliseconds(20));
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(slice).count();
    struct timespec ts{static_cast<time_t>(ns / 1000000000), static_cast<long>(ns % 1000000000)};
    ::syscall(SYS_futex, word, FUTEX_WAIT, v, &ts, nullptr, 0);
  }
}

// ---------------------------------------------------------------- RegionTableView

namespace {

// The size of the board memfd a target sent: at least its counters (the memfd is sealed against
// shrinking, so the mapping cannot lose pages under us).
size_t board_bytes(int busy_fd) {
  struct stat st{};
  if (::fstat(busy_fd, &st) != 0 || static_cast<size_t>(st.st_size) < BusyBoard::counter_bytes()) {
    ::close(busy_fd);
    fail(ErrorCode::kProtocol, "cma: the target's busy board is smaller than its counters "
                               "(another kvtransfer version?); use the same kvtransfer version on both sides");
  }
  return std::min(static_cast<size_t>(st.st_size), BusyBoard::bytes());
}

}  // namespace

RegionTableView::RegionTableView(int table_fd, int busy_fd)
    : table_(table_fd, RegionTable::bytes(), false), busy_(busy_fd, board_bytes(busy_fd), true) {
  if (load(header().magic) != kTableMagic || header().capacity != kTableCapacity) {
    fail(ErrorCode::kProtocol,
         "cma: the target's region table has an unknown layout (another kvtransfer version?); "
         "use the same kvtransfer version on both sides");
  }
}

const TableHeader& RegionTableView::header() const {
  return *reinterpret_cast<const TableHeader*>(table_.data());
}

const TableEntry& RegionTableView::entry(uint32_t slot) const {
  return reinterpret_cast<const TableEntry*>(table_.data() + sizeof(TableHeader))[slot];
}

char* RegionTableView::ring_area() const {
  return busy_.size() >= BusyBoard::bytes() ? busy_.data() + BusyBoard::counter_bytes() : nullptr;
}

uint32_t* RegionTableView::busy(uint32_t slot) const {
  return reinterpret_cast<uint32_t*>(busy_.data()) + slot;
}

Grant RegionTableView::acquire(const RemoteRegion& remote, bool write, uint64_t extent) {
  const std::string region = "region " + std::to_string(remote.id);
  if (remote.rkey.empty()) {
    // Regions are listed only once their transport published them, so this peer's list did
    // not come from a cma endpoint.
    fail(ErrorCode::kProtocol,
         region + " of the peer carries no cma key: the peer does not serve it over cma");
  }
  uint32_t slot = decode_slot(remote.rkey);
  if (slot >= kTableCapacity) {
    fail(ErrorCode::kProtocol, "remote access to " + region + " with a wrong key");
  }
  const TableEntry& e = entry(slot);
  uint64_t seq = load(e.seq);
  if (seq % 2 == 0 || load(e.id) != remote.id) {
    fail(ErrorCode::kInvalidRequest,
         region + " of the peer is not registered any more (deregistered while the transfer "
                  "was in flight)");
  }
  uint64_t key = load(e.key), addr = load(e.addr), len = load(e.len);
  uint32_t perms = load(e.perms);
  if (load(e.seq) != seq) {
    fail(ErrorCode::kInvalidRequest, region + " of the peer was deregistered during the transfer");
  }
  if (key != remote.key) fail(ErrorCode::kProtocol, "remote access to " + region + " with a wrong key");
  if (write && !(perms & kPermWrite)) {
    fail(ErrorCode::kProtocol, "remote write to " + region + ", which is not registered with remote_write=True");
  }
  if (!write && !(perms & kPermRead)) {
    fail(ErrorCode::kProtocol, "remote read of " + region + ", which is not registered with remote_read=True");
  }
  if (extent > len) {
    fail(ErrorCode::kProtocol, "access up to byte " + std::to_string(extent) + " outside " +
                                   region + " of " + std::to_string(len) + " bytes");
  }
  __atomic_add_fetch(busy(slot), 1, __ATOMIC_SEQ_CST);
  if (load(e.seq) != seq) {
    release(Grant{slot, seq, addr});
    fail(ErrorCode::kInvalidRequest, region + " of the peer was deregistered during the transfer");
  }
  return Grant{slot, seq, addr};
}

void RegionTableView::release(const Grant& g) {
  uint32_t left = __atomic_sub_fetch(busy(g.slot), 1, __ATOMIC_SEQ_CST);
  // The target waits on this word only after withdrawing the slot; it must hear the last exit.
  if (left == 0 && load(entry(g.slot).seq) != g.seq) {
    ::syscall(SYS_futex, busy(g.slot), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
  }
}

std::string encode_slot(uint32_t slot) {
  std::string out(4, '\0');
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((slot >> (8 * i)) & 0xff);
  return out;
}

uint32_t decode_slot(const std::string& rkey) {
  if (rkey.size() != 4) return UINT32_MAX;
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(rkey[i])) << (8 * i);
  return v;
}

}  // namespace kvt::cma
