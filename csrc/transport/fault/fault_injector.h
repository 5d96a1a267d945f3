// Fault injection as a decorator around any transport, so the completion contract is proven
// under delays, reordering (what EFA's SRD does) and dropped connections on every build, not
// only on EFA. Enabled per endpoint with a spec string (Endpoint(faults="...")), e.g.
//   "reorder=1,delay_ms=20,arrival_delay_ms=1,drop_after_bytes=1048576,corrupt_key=1,seed=7"
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <random>
#include <string>

#include "transport/transport.h"

namespace kvt::fault {

struct FaultSpec {
  bool reorder = false;            // shuffle each operation's segments before the transport
  double delay_ms = 0;             // hold each operation this long before posting it
  double arrival_delay_ms = 0;     // target: report each arrived unit this much later
  uint64_t drop_after_bytes = 0;   // initiator: drop the data link once this many bytes posted
  bool corrupt_key = false;        // initiator: present wrong remote keys (the target must refuse)
  uint64_t seed = 1;
};

// Parses "key=value,..." (keys above); throws InvalidRequest naming a bad key or value.
FaultSpec parse_fault_spec(const std::string& spec);

// Sits between the Endpoint and the real transport: it is the transport the Endpoint sees and
// the sink the real transport reports to.
class FaultInjector : public Transport, public TransportSink {
 public:
  FaultInjector(FaultSpec spec, TransportSink& upstream) : spec_(spec), upstream_(upstream), rng_(spec.seed) {}
  void wrap(std::unique_ptr<Transport> inner) { inner_ = std::move(inner); }

  // Transport
  TransportCaps caps() const override {
    TransportCaps c = inner_->caps();
    // A delayed op stands for an initiator that stalled after starting the transfer: its BEGIN
    // goes ahead on the control channel so the target knows of it, as it would have.
    if (spec_.delay_ms > 0) c.carries_begin = false;
    return c;
  }
  std::string address() const override { return inner_->address(); }
  std::string register_region(const Region& r) override { return inner_->register_region(r); }
  void deregister_region(const Region& r) override { inner_->deregister_region(r); }
  void accept_session(uint64_t peer, uint64_t token) override { inner_->accept_session(peer, token); }
  void end_session(uint64_t peer) override { inner_->end_session(peer); }
  std::unique_ptr<DataLink> connect(uint64_t peer, const std::string& remote_address,
                                    uint64_t token) override;
  void shutdown() override { inner_->shutdown(); }
  bool reader_begin(bool sleeps) override { return inner_->reader_begin(sleeps); }
  bool poll_inbound(bool sleeps) override { return inner_->poll_inbound(sleeps); }
  bool sleep_inbound(int wake_fd, int timeout_ms) override {
    return inner_->sleep_inbound(wake_fd, timeout_ms);
  }
  void reader_end(bool sleeps) override { inner_->reader_end(sleeps); }

  // TransportSink
  void on_arrival(uint64_t peer, uint64_t slot, uint32_t units) override;
  void on_begin(uint64_t peer, const std::string& body) override { upstream_.on_begin(peer, body); }
  void on_refused(uint64_t peer, uint64_t slot, const Error& e) override { upstream_.on_refused(peer, slot, e); }
  bool accepts(uint64_t peer, uint64_t slot) override { return upstream_.accepts(peer, slot); }
  void on_read_landed(uint64_t slot, uint32_t units) override { upstream_.on_read_landed(slot, units); }
  void on_op_failed(uint64_t slot, const Error& e) override { upstream_.on_op_failed(slot, e); }
  void on_link_failed(uint64_t peer, const Error& e) override { upstream_.on_link_failed(peer, e); }

  const FaultSpec& spec() const { return spec_; }
  uint64_t next_seed() {
    std::lock_guard<std::mutex> lock(mu_);
    return rng_();
  }

 private:
  FaultSpec spec_;
  TransportSink& upstream_;
  std::unique_ptr<Transport> inner_;
  std::mutex mu_;
  std::mt19937_64 rng_;
};

}  // namespace kvt::fault
