// The target's counted completion: a transfer is complete when its BEGIN (with the number of
// units to expect and the notification) has arrived and that many units have landed, in any
// order. A transfer that fails (deadline, initiator gone, abort) is remembered for a while so
// that units arriving late never complete it.
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/transfer_state.h"
#include "wire/control.h"

namespace kvt {

struct InboundOutcome {
  uint64_t peer = 0;
  uint64_t slot = 0;
  bool ok = false;
  bool has_notify = false;
  std::string payload;
  std::string peer_name;
  ErrorCode code = ErrorCode::kTransport;
  std::string error;
};

class InboundTracker {
 public:
  explicit InboundTracker(double default_timeout_s) : default_timeout_s_(default_timeout_s) {}

  // `deadline` is on this host's clock: the endpoint maps the initiator's start time onto it,
  // so a BEGIN read late (this process was frozen) is already expired and fails at once.
  std::optional<InboundOutcome> begin(uint64_t peer, const std::string& peer_name,
                                      const wire::Begin& m, Clock::time_point deadline);
  std::optional<InboundOutcome> arrive(uint64_t peer, uint64_t slot, uint32_t units);
  std::optional<InboundOutcome> abort(uint64_t peer, uint64_t slot, ErrorCode code,
                                      const std::string& reason);
  std::vector<InboundOutcome> fail_peer(uint64_t peer, const std::string& reason);
  std::vector<InboundOutcome> expire(Clock::time_point now);
  size_t pending() const;
  bool accepts(uint64_t peer, uint64_t slot) const;
  std::vector<InboundOutcome> refuse_prefix(const std::string& prefix, const std::string& reason);

 private:
  struct Entry {
    bool begun = false;
    uint32_t expected = 0;
    uint32_t arrived = 0;
    bool has_notify = false;
    std::string payload;
    std::string peer_name;
    Clock::time_point deadline;
  };
  using Key = std::pair<uint64_t, uint64_t>;
  std::optional<InboundOutcome> settle_locked(const Key& k);
  InboundOutcome fail_locked(std::map<Key, Entry>::iterator it, ErrorCode code, std::string error);

  double default_timeout_s_;
  mutable std::mutex mu_;
  std::map<Key, Entry> live_;
  // Failed slots: late units never revive them. A slot that failed before its BEGIN arrived
  // (refused data, abort) is reported when the BEGIN comes, with the reason kept here.
  struct Failed {
    Clock::time_point forget_at;
    bool reported = false;
    ErrorCode code = ErrorCode::kTransport;
    std::string reason;
  };
  std::map<Key, Failed> failed_;
  std::map<std::string, std::pair<Clock::time_point, std::string>> refused_;  // prefix -> (until, why)
};

}  // namespace kvt
