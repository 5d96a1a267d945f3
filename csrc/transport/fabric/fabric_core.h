// The fabric transport's shared state: its rails, registrations, target-side sessions and the
// transfers in flight. Links hold it by shared_ptr, so a Peer that outlives its Endpoint (Python
// keeps it) closes against a core that is shut down instead of freed memory.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "transport/fabric/fabric_info.h"
#include "transport/fabric/fabric_mr.h"
#include "transport/fabric/fabric_ops.h"
#include "transport/fabric/fabric_rail.h"
#include "transport/fabric/fabric_reporter.h"
#include "transport/fabric/fabric_session.h"
#include "transport/transport.h"

namespace kvt::fabric {

// A data path to one peer: where each local rail reaches each of the peer's rails, and the tag
// the peer gave this session.
struct Connection {
  uint64_t token = 0;  // the Endpoint's session token (names the session in RETIRE)
  uint32_t tag = 0;
  size_t remote_rails = 0;
  std::vector<std::vector<fi_addr_t>> dest;  // [local rail][remote rail]
};

class FabricCore : public RailEvents {
 public:
  explicit FabricCore(TransportContext ctx);
  ~FabricCore() override;

  TransportCaps caps() const;
  std::string address() const { return address_; }
  std::string register_region(const Region& region) { return mrs_->add(region); }
  void deregister_region(const Region& region);
  void accept_session(uint64_t peer, uint64_t token) { sessions_.accept(peer, token); }
  void end_session(uint64_t peer);
  Connection connect(const std::string& remote_address, uint64_t token);
  void disconnect(const Connection& c);
  void shutdown();

  // For links.
  const std::string& provider() const { return provider_; }
  bool rdma_read() const { return rdma_read_; }
  bool stopping() const { return stopping_.load(); }
  size_t rail_count() const { return rails_.size(); }
  const Rail& rail(size_t i) const { return *rails_[i]; }
  std::vector<void*> descriptors(uint32_t region_id) const { return mrs_->descriptors(region_id); }
  TransportSink& sink() { return ctx_.sink; }
  uint64_t new_link_id() { return next_link_++; }
  void post_batch(std::unique_ptr<Batch> batch);
  // Links announce themselves so a RETIRE from their peer finds them.
  void add_link(uint64_t link, const Connection& c);
  void remove_link(uint64_t link);
  bool region_retired(uint64_t link, uint32_t region);
  // Stops the link's transfers and waits (up to wait_s) for what the provider still holds;
  // true when nothing of it is left in flight.
  bool cancel_link(uint64_t link, double wait_s);

  // RailEvents (completion threads).
  void on_done(Rail& rail, OpCtx* op) override;
  void on_failed(Rail& rail, OpCtx* op, int err, int prov_errno, const std::string& why) override;
  void on_skipped(Rail& rail, OpCtx* op) override;
  void on_message(Rail& rail, const void* data, size_t len) override;
  void on_remote_write(Rail& rail, uint64_t imm) override;
  void on_async_error(Rail& rail, const std::string& why) override;
  void on_idle(Rail& rail) override;

 private:
  // The transport's own messages (hello, hello-ack): owned here until they complete.
  struct OwnedSend : SendCtx {
    uint64_t token = 0;
    bool hello = false;
    bool retire = false;  // a RETIRE for `region`: failing to send it counts as an answer
    uint32_t region = 0;
    bool forget_dest = false;  // a refusal to an address inserted only to answer it
    Rail* rail = nullptr;
  };
  struct HelloWait {
    bool done = false;
    uint32_t tag = 0;
    std::string error;
  };
  void send_owned(size_t rail, OwnedSend* s);
  void finish_owned(OwnedSend* s, const std::string& error);
  void finish(Batch* b);
  void handle_hello(Rail& rail, const struct Msg& m);
  void handle_retire(const struct Msg& m);
  void send_retired(uint64_t token, uint32_t region, fi_addr_t to);
  size_t in_flight_locked(uint64_t link, uint32_t region) const;
  std::shared_ptr<const Region> hold_region(uint32_t id, uint64_t key, Access access);
  void probe_efa();

  TransportContext ctx_;
  DeferredReports reports_;
  std::string provider_;
  bool rdma_read_ = false;
  bool hmem_ = false;
  bool delivery_complete_ = false;
  std::vector<std::unique_ptr<Rail>> rails_;
  std::unique_ptr<MrTable> mrs_;
  std::string address_;
  SessionTable sessions_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_link_{1};

  std::mutex mu_;  // batches_, owned_, hellos_
  std::condition_variable cv_;
  std::unordered_map<Batch*, std::unique_ptr<Batch>> batches_;
  std::set<OwnedSend*> owned_;
  std::unordered_map<uint64_t, HelloWait> hellos_;  // by token
  // Initiator side of RETIRE: our links by session token, regions their peer retired, and
  // answers owed once the transfers into those regions are over.
  struct LinkInfo {
    uint64_t id = 0;
    fi_addr_t target = FI_ADDR_UNSPEC;
    std::set<uint32_t> retired;
  };
  std::unordered_map<uint64_t, LinkInfo> links_;  // by token
  struct OwedRetired {
    uint64_t link, token;
    uint32_t region;
    fi_addr_t to;
  };
  std::vector<OwedRetired> owed_;
  // Target side: per region being deregistered, the sessions (tokens) yet to answer.
  std::map<uint32_t, std::set<uint64_t>> retiring_;
};

}  // namespace kvt::fabric
