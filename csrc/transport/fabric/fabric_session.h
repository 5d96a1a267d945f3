// The target's side of the immediate: which session a 12-bit tag is, and which slot each
// session's 20-bit transfer number n stands for. Units that arrive before their MAP message are
// counted and reported when it comes (EFA's SRD reorders freely).
//
// It also keeps target memory safe under deregistration. The software providers (ofi_rxd,
// ofi_rxm, shm) check a write's key at its first packet and then place the rest from the
// iovecs they set up, even after the registration was closed; a read's data is likewise sent
// from memory checked once. So every transfer is tracked by region from its MAP / READ-BEGIN
// until its last unit landed, its initiator says it is over (RELEASE), or its session ends:
//  * while its region is registered it holds the Region, and the Endpoint's deregistration
//    waits for such holds exactly as it does for the TCP transport's;
//  * one announced after the region left the registry is refused (the target says why) but
//    still tracked, and deregister_region() waits for it to finish landing before it closes
//    the registration: memory is freed only once no provider will touch it, and no provider is
//    made to refuse a unit it already started (ofi_rxd stalls the whole peer when it does).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/region_registry.h"
#include "transport/fabric/fabric_api.h"

namespace kvt::fabric {

class SessionTable {
 public:
  using Clock = std::chrono::steady_clock;
  struct Arrival {
    uint64_t peer;
    uint64_t slot;
    uint32_t units;
  };
  struct Hello {
    uint32_t tag = 0;  // 0: refused
    uint64_t peer = 0;
    std::string refusal;
    bool fresh = false;  // a new session (its reply address must be inserted)
  };

  void accept(uint64_t peer, uint64_t token);
  Hello hello(uint64_t token);
  void set_reply_addr(uint32_t tag, fi_addr_t addr);
  std::optional<uint64_t> peer_of(uint32_t tag) const;
  struct Live {
    uint64_t token;
    fi_addr_t reply;
  };
  std::vector<Live> live() const;  // sessions that said hello (with where to answer them)
  // Forgets the peer's sessions; returns them (their reply addresses leave the AV).
  std::vector<Live> end(uint64_t peer);

  // A write's MAP: n is `slot`, `units` long, into `region` (hold: null when refused).
  std::optional<Arrival> map(uint32_t tag, uint32_t seq, uint32_t units, uint64_t slot,
                             uint32_t region, std::shared_ptr<const Region> hold);
  std::optional<Arrival> arrive(uint32_t imm);
  void read_begin(uint32_t tag, uint32_t seq, uint32_t region, std::shared_ptr<const Region> hold);
  void release(uint32_t tag, uint32_t seq);  // transfer n is over, however it ended
  // Waits until no transfer announced into `region` is still landing; false on timeout.
  bool wait_quiet(uint32_t region, std::chrono::duration<double> timeout);

  // Drops entries older than max_age (transfers that failed half way never complete).
  void sweep(Clock::duration max_age);
  std::string debug_state() const;  // sessions and what each still waits for

 private:
  struct Pending {
    bool mapped = false;
    uint64_t slot = 0;
    uint32_t units = 0;
    uint32_t arrived = 0;
    uint32_t region = 0;
    Clock::time_point born;
    std::shared_ptr<const Region> hold;
  };
  struct Read {
    uint32_t region = 0;
    Clock::time_point born;
    std::shared_ptr<const Region> hold;
  };
  struct Session {
    uint64_t peer = 0;
    uint64_t token = 0;
    fi_addr_t reply = FI_ADDR_UNSPEC;
    std::unordered_map<uint32_t, Pending> pending;  // writes, by n
    std::unordered_map<uint32_t, Read> reads;       // by n
  };
  uint32_t allocate_tag_locked();
  bool busy_locked(uint32_t region) const;

  mutable std::mutex mu_;
  std::condition_variable changed_;  // a transfer finished or was forgotten
  std::unordered_map<uint64_t, uint64_t> tokens_;    // accepted session token -> peer
  std::unordered_map<uint64_t, uint32_t> by_token_;  // token -> tag, once hello'd
  std::map<uint32_t, Session> sessions_;             // tag -> session
  uint32_t next_tag_ = 1;
  uint64_t dropped_ = 0;  // units for no live session (after end_session)
};

}  // namespace kvt::fabric
