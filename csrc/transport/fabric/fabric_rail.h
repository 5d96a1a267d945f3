// One rail: a domain (NIC) with its endpoint, address vector, completion queue, a small
// registered arena for the transport's own messages, a software queue in front of the
// provider's transmit queue, and the completion thread that drives it all.
//
// Progress. The completion thread blocks in fi_cq_sread (wait object FI_WAIT_UNSPEC), which
// also drives the provider's progress engine - FI_PROGRESS_MANUAL providers (ofi_rxm, ofi_rxd,
// shm, efa) move data only inside such calls, on the target as much as on the initiator, so
// every rail of every endpoint always has this thread waiting in the provider. The wait is
// bounded (kIdleWaitMs) so protocol timers (rxd's retransmits) run while idle; while the
// provider pushes back with -FI_EAGAIN it is kBusyWaitMs. A provider with no CQ wait objects
// (EFA before libfabric 2.4), or whose wait is a spin (shm), gets a polling loop that backs
// off to kMaxBackoff when idle: bounded latency, a few hundred wake-ups a second, no spinning.
//
// Transmit depth is the provider's tx_attr->size: that many operations are outstanding at most;
// the rest wait, in order, in the software queue, which the completion thread refills from as
// completions return credits (and which a poster fills through directly while credits last).
// Operations are taken from the queue under the lock but handed to the provider outside it, so
// a provider call that never returns (shm 1.17 spinning on the lock of a peer that was killed
// holding it) cannot wedge the queue; shm peers are also checked for being alive before each
// operation to them. stop() waits kStopGrace for the completion thread and otherwise abandons
// the rail (leaking its libfabric objects, which a stuck thread may still be inside) rather
// than hang the Endpoint's close().
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transport/fabric/fabric_api.h"
#include "transport/fabric/fabric_info.h"
#include "transport/fabric/fabric_local_peers.h"
#include "transport/fabric/fabric_ops.h"

namespace kvt::fabric {

class Rail;

// What the completion thread reports; called without the rail's lock held.
class RailEvents {
 public:
  virtual ~RailEvents() = default;
  virtual void on_done(Rail& rail, OpCtx* op) = 0;                          // write/read/send
  // ... ended with an error: err is the positive FI_* errno, why says it in words.
  // prov_errno: the provider's own code (0 when none).
  virtual void on_failed(Rail& rail, OpCtx* op, int err, int prov_errno, const std::string& why) = 0;
  virtual void on_skipped(Rail& rail, OpCtx* op) = 0;  // dropped unposted (its batch ended)
  virtual void on_message(Rail& rail, const void* data, size_t len) = 0;
  virtual void on_remote_write(Rail& rail, uint64_t imm) = 0;
  virtual void on_async_error(Rail& rail, const std::string& why) = 0;
  virtual void on_idle(Rail& rail) = 0;  // at most about once a second
};

struct RailLimits {
  size_t tx_depth = 0;
  size_t iov_limit = 1;
  size_t rma_iov_limit = 1;
  uint64_t max_msg_size = 0;
  uint64_t mr_mode = 0;
  size_t mr_key_size = 8;
  uint64_t mode = 0;
  bool manual_progress = false;
  bool hmem = false;
  bool delivery_complete = false;  // writes carry FI_DELIVERY_COMPLETE
};

class Rail {
 public:
  static constexpr int kIdleWaitMs = 100;
  static constexpr int kBusyWaitMs = 1;
  static constexpr auto kMaxBackoff = std::chrono::milliseconds(1);
  static constexpr auto kStopGrace = std::chrono::seconds(3);
  // Before the endpoint is closed, the provider is progressed until it has been quiet this
  // long (at most kDrainLimit); see drain().
  static constexpr auto kDrainQuiet = std::chrono::milliseconds(10);
  static constexpr auto kDrainLimit = std::chrono::milliseconds(250);

  Rail(uint32_t index, InfoPtr info, RailEvents& events, bool delivery_complete);
  ~Rail();
  Rail(const Rail&) = delete;
  Rail& operator=(const Rail&) = delete;

  uint32_t index() const { return index_; }
  const std::string& domain_name() const { return domain_name_; }
  const std::string& raw_address() const { return address_; }
  const RailLimits& limits() const { return limits_; }
  const fi_info* info() const { return info_.get(); }
  fid_domain* domain() const { return obj_ ? obj_->domain : nullptr; }
  fid_ep* ep() const { return obj_ ? obj_->ep : nullptr; }
  std::string describe() const;  // "shm on shm (tx depth 1024, iov 4/4, mr_mode [...])"

  // Inserts a peer's raw address (or counts another use of it); throws TransportError.
  fi_addr_t insert(const std::string& raw);
  // Drops one use; the last one forgets the address kAvGrace later, on the completion thread:
  // never concurrently with progress that may still hold a command from that peer (shm 1.17
  // crashes on that race when a peer was killed mid-transfer), and never while its last
  // completions may still come.
  void remove(fi_addr_t addr);
  static constexpr auto kAvGrace = std::chrono::seconds(5);

  // Queues ops in order and posts what credits allow. Thread-safe.
  void submit(const std::vector<OpCtx*>& ops);
  // Re-examines the queue (drops ops of ended batches) from the calling thread.
  void kick();

  // Stops the completion thread and closes the endpoint (shm, efa: or parks it, see
  // fabric_local_peers.h): nothing completes afterwards.
  void stop();
  // stop() had to leave a thread stuck inside the provider: nothing of this rail may be freed.
  bool abandoned() const { return abandoned_; }
  // Closes everything else (after the transport closed its memory registrations).
  void close();

  std::string strerror_cq(int prov_errno, const void* err_data) const;
  std::string debug_state();  // queue, credits, slots (KVTRANSFER_FABRIC_DEBUG)

 private:
  void open();
  void post_receives();
  ssize_t post(OpCtx* op, int send_slot);
  struct Failure {
    OpCtx* op;
    int err;
    int prov_errno;
    std::string why;
  };
  // Posts queued operations while credits last; any thread. False: the provider pushed back.
  bool pump();
  void report(std::vector<OpCtx*>& skipped, std::vector<Failure>& failed);
  bool peer_gone(fi_addr_t addr, std::string* why);
  void completion_loop();
  void handle(const fi_cq_data_entry& e);
  void handle_error();
  void release(OpCtx* op);  // returns a credit (and a send slot)
  void repost(RecvCtx* r);
  void forget_due();
  // After the completion thread stopped: progresses the provider, dropping what it reports,
  // until it has been quiet for kDrainQuiet (or kDrainLimit passed).
  void drain();
  // shm/efa, after the completion thread stopped: empties our AV, then closes the endpoint or
  // parks it while other rails of this process still address it.
  void retire_local();

  const uint32_t index_;
  InfoPtr info_;
  RailEvents& events_;
  RailLimits limits_;
  std::string domain_name_;
  std::string address_;

  // Its libfabric objects; handed to LocalPeers when a same-process peer still addresses them.
  std::unique_ptr<RailObjects> obj_ = std::make_unique<RailObjects>();
  // shm, efa: peers in this process share our mapped memory (see fabric_local_peers.h).
  bool shares_local_memory_ = false;
  void* arena_desc_ = nullptr;
  bool cq_waits_ = true;  // false: no wait objects, poll with back-off
  // Callers of submit() post themselves (else they only queue and wake the completion thread:
  // shm, where a provider call can spin forever on a dead peer's lock - never a user's thread).
  bool post_inline_ = true;

  // Message arena (obj_->arena): send slots then receive slots, kMaxMsgBytes each.
  size_t send_slots_ = 0;
  size_t recv_slots_ = 0;

  std::mutex post_mu_;  // around each post / receive / AV call into the provider (never with mu_)
  std::mutex mu_;  // queue_, credits_, free_sends_, busy_, repost_, forget_
  std::condition_variable wake_;  // polling mode: new work
  std::deque<OpCtx*> queue_;
  size_t credits_ = 0;
  std::vector<int> free_sends_;
  std::vector<RecvCtx*> repost_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, fi_addr_t>> forget_;
  bool busy_ = false;  // the provider said -FI_EAGAIN: retry soon
  bool kicked_ = false;  // polling mode: work was submitted since the last look
  std::atomic<bool> stopping_{false};
  bool exited_ = false;  // the completion thread returned
  std::condition_variable exited_cv_;
  bool abandoned_ = false;
  std::thread thread_;
  // shm: the process behind each peer address, checked before every operation to it.
  struct PeerProcess {
    int pid = 0;
    std::chrono::steady_clock::time_point checked;
    bool alive = true;
    std::string raw;  // its address: a parked endpoint of this process is gone too
  };
  std::map<fi_addr_t, PeerProcess> processes_;  // under mu_
  struct AvEntry {
    fi_addr_t addr = FI_ADDR_UNSPEC;
    size_t refs = 0;
  };
  std::mutex av_mu_;  // serialises insert() and the removals, so one address has one entry
  std::map<std::string, AvEntry> by_raw_;         // under mu_
  std::map<fi_addr_t, std::string> raw_of_;       // under mu_
};

}  // namespace kvt::fabric
