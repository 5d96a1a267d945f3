// An Endpoint: registered memory, a handshake listener, peers, and one-sided transfers with
// counted completion and notifications, over whichever Transport it was built with.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/handoff_thread.h"
#include "core/inbound_tracker.h"
#include "core/notification_queue.h"
#include "core/region_registry.h"
#include "core/thread_set.h"
#include "core/transfer_state.h"
#include "engine/control_channel.h"
#include "engine/endpoint_stats.h"
#include "transport/fault/fault_injector.h"
#include "transport/transport.h"

namespace kvt {

struct EndpointOptions {
  std::string name = "kvtransfer";
  std::string transport = "tcp";
  std::string listen = "127.0.0.1:0";
  std::string auth_token;   // empty: no authentication
  double timeout_s = 5.0;   // default transfer deadline and dead-peer bound
  int connections = 2;      // parallel data connections per peer (TCP)
  std::string provider;     // fabric provider
  bool checksum = false;    // crc32c over payload bytes too (control messages always have one)
  std::string faults;       // fault injection spec (transport/fault/), empty: none
};

// Per-transfer knobs; negative / unset values take the endpoint's.
struct TransferOptions {
  double timeout_s = -1;
  int checksum = -1;  // -1: endpoint default, 0: off, 1: on
};

struct PeerConn;

class Endpoint : public TransportSink {
 public:
  explicit Endpoint(EndpointOptions options);
  ~Endpoint() override;
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;

  std::shared_ptr<const Region> register_region(uintptr_t addr, uint64_t nbytes,
                                                bool remote_write, bool remote_read);
  void deregister_region(uint32_t id, double timeout_s);

  std::string address() const { return address_; }
  std::string name() const { return options_.name; }
  TransportCaps caps() const { return transport_->caps(); }
  std::string info() const;

  std::shared_ptr<PeerConn> connect(const std::string& info_or_address, double timeout_s);
  std::map<uint32_t, uint64_t> peer_regions(PeerConn& peer, double timeout_s);

  // segments: n rows of (src_off, dst_off, len). For a write src is local and dst remote; for
  // a read src is remote and dst local.
  std::shared_ptr<TransferState> write(PeerConn& peer, uint32_t local_region, uint32_t remote_region,
                                       const int64_t* segments, size_t n, const std::string* notify,
                                       const TransferOptions& opts);
  std::shared_ptr<TransferState> read(PeerConn& peer, uint32_t local_region, uint32_t remote_region,
                                      const int64_t* segments, size_t n, const std::string* notify,
                                      const TransferOptions& opts);

  Notification wait_notification(const std::string& payload, double timeout_s, double spin_s = 0.0);
  std::vector<Notification> notifications(double timeout_s);
  // Fails inbound transfers whose notification starts with `prefix` and refuses new ones for
  // a while; on TCP their bytes still in flight are discarded instead of landing.
  void refuse_inbound(const std::string& prefix, const std::string& reason);
  std::vector<Error> errors() const;
  // Best effort: ends a pending transfer in ERROR now and tells the target to fail it too
  // (bytes already in flight may still land there). False if it had already ended.
  bool cancel(TransferState& x);
  // Closes a peer we connected to: its transfers in flight end in ERROR.
  void disconnect(PeerConn& peer);
  StatsSnapshot stats() const { return stats_.snapshot(); }
  void close();

  // TransportSink
  void on_arrival(uint64_t peer, uint64_t slot, uint32_t units) override;
  void on_begin(uint64_t peer, const std::string& body) override;
  void on_refused(uint64_t peer, uint64_t slot, const Error& error) override;
  bool accepts(uint64_t peer, uint64_t slot) override;
  void on_read_landed(uint64_t slot, uint32_t units) override;
  void on_op_failed(uint64_t slot, const Error& error) override;
  void on_link_failed(uint64_t peer, const Error& error) override;

 private:
  std::shared_ptr<TransferState> start(OpKind kind, PeerConn& peer, uint32_t local_region,
                                       uint32_t remote_region, const int64_t* segments, size_t n,
                                       const std::string* notify, const TransferOptions& opts);
  RemoteRegion remote_region(PeerConn& peer, uint32_t id, double timeout_s);
  void accept_loop();
  void serve_peer(std::shared_ptr<PeerConn> peer, bool handshake);
  void handshake_as_server(PeerConn& peer);
  void handshake_as_client(PeerConn& peer);
  void handle(PeerConn& peer, const ControlMessage& m);
  void begin_inbound(PeerConn& peer, const std::string& body);
  void settle(InboundOutcome o);
  struct OwedAck {
    uint64_t peer;  // looked up when sent: off a reading waiter's path, and gone peers are skipped
    wire::Ack ack;
  };
  // Set while a waiting thread reads inbound data (WaitingReader): the ACKs that what it
  // settles owes are collected there instead of sent.
  static thread_local std::vector<OwedAck>* owed_acks_;
  void send_ack(const OwedAck& ack);
  void send_acks(std::vector<OwedAck>& acks);
  class WaitingReader;
  void finish_transfer(uint64_t slot, TransferStatus s, ErrorCode code, const std::string& error);
  void peer_failed(uint64_t peer, const Error& error);
  void record_error(const Error& e);
  void watchdog_loop();
  void add_pending();
  std::shared_ptr<PeerConn> find_peer(uint64_t id);
  void reap_dead_peers();
  void abort_remote(uint64_t peer, uint64_t slot, const std::string& reason);

  EndpointOptions options_;
  RegionRegistry regions_;
  std::unique_ptr<Transport> transport_;
  bool carries_begin_ = false;
  net::Socket listener_;
  std::string address_;

  std::mutex mu_;  // peers_, transfers_
  std::map<uint64_t, std::shared_ptr<PeerConn>> peers_;
  std::map<uint64_t, std::shared_ptr<TransferState>> transfers_;
  std::atomic<uint64_t> next_peer_{1};
  std::atomic<uint64_t> next_slot_{1};

  InboundTracker inbound_;
  NotificationQueue notifications_;
  EndpointStats stats_;
  mutable std::mutex errors_mu_;
  std::vector<Error> errors_;

  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  // True while the watchdog sleeps its long idle wait: only then does new work need to wake it
  // (a wake per transfer would put another thread on the latency path of a 2-core host).
  std::atomic<bool> watch_idle_{false};
  std::atomic<bool> closing_{false};
  std::thread watchdog_;
  ThreadSet threads_;
  HandoffThread handoff_;  // finishes a reading waiter's work after it has returned
};

// One connection to another endpoint: its control channel, and for peers we connected to, the
// data link and what regions they expose.
struct PeerConn {
  uint64_t id = 0;
  bool outbound = false;
  std::string name;     // the other endpoint's name
  std::string address;  // its handshake address
  std::unique_ptr<ControlChannel> control;
  std::unique_ptr<DataLink> link;
  std::atomic<bool> dead{false};
  std::string death;  // why it is dead (under mu)

  std::mutex mu;
  std::condition_variable cv;
  std::map<uint32_t, RemoteRegion> regions;
  uint64_t regions_version = 0;
  // Our CLOCK_MONOTONIC minus the peer's, measured at the handshake (includes the one-way
  // delay, which only makes deadlines later, never earlier). Unset when the peer sent none.
  bool has_clock_offset = false;
  int64_t clock_offset_ns = 0;
};

}  // namespace kvt
