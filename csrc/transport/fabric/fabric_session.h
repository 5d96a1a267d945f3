// The target's side of the immediate: which session a 12-bit tag is, and which slot each
// session's 20-bit transfer number n stands for. Units that arrive before their MAP message are
// counted and reported when it comes (EFA's SRD and udp;ofi_rxd reorder freely).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

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
  // Forgets the peer's sessions; returns the reply addresses to remove from the AV.
  std::vector<fi_addr_t> end(uint64_t peer);
  std::optional<Arrival> map(uint32_t tag, uint32_t seq, uint32_t units, uint64_t slot);
  std::optional<Arrival> arrive(uint32_t imm);
  // Drops entries older than max_age (transfers that failed half way never complete).
  void sweep(Clock::duration max_age);
  uint64_t dropped() const;  // units for no live session (after end_session)
  std::string debug_state() const;  // sessions and what each still waits for

 private:
  struct Pending {
    bool mapped = false;
    uint64_t slot = 0;
    uint32_t units = 0;
    uint32_t arrived = 0;
    Clock::time_point born;
  };
  struct Session {
    uint64_t peer = 0;
    uint64_t token = 0;
    fi_addr_t reply = FI_ADDR_UNSPEC;
    std::unordered_map<uint32_t, Pending> pending;  // by n
  };
  uint32_t allocate_tag_locked();

  mutable std::mutex mu_;
  std::unordered_map<uint64_t, uint64_t> tokens_;  // accepted session token -> peer
  std::unordered_map<uint64_t, uint32_t> by_token_;  // token -> tag, once hello'd
  std::map<uint32_t, Session> sessions_;             // tag -> session
  uint32_t next_tag_ = 1;
  uint64_t dropped_ = 0;
};

}  // namespace kvt::fabric
