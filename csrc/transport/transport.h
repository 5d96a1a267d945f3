// The one interface every data path implements (TCP, libfabric, ibverbs). A transport moves
// bytes between registered regions and reports what arrived; it knows nothing of KV caches,
// notifications or deadlines. Those live in the Endpoint above it, the same for every transport.
//
// Completion is counted, never inferred from ordering: an operation is prepared into `units`
// (TCP frames, fabric writes...), each of which the target reports once through
// TransportSink::on_arrival as it becomes visible in memory. The Endpoint tells the target how
// many units to expect, so any arrival order (EFA's SRD reorders) gives the same result.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/region_registry.h"

namespace kvt {

// What a transport honestly offers; the conformance suite skips only what is not claimed.
struct TransportCaps {
  std::string name;               // "tcp", "fabric:tcp;ofi_rxm", ...
  bool rdma_read = false;         // Endpoint::read works
  bool ordered = false;           // units arrive in posting order (never relied upon)
  bool software_key_check = false;  // keys and bounds checked by our code (vs. the NIC)
  // A one-unit write can carry the Endpoint's BEGIN in its unit (PreparedOp::begin), delivered
  // through TransportSink::on_begin: one message instead of two on the latency path.
  bool carries_begin = false;
  uint64_t max_segment = UINT64_MAX;
};

struct Segment {
  uint64_t src_off;
  uint64_t dst_off;
  uint64_t len;
};

enum class OpKind { kWrite, kRead };

// One validated operation: segments (offsets into local and remote region, no zero lengths)
// between a local region held alive for the op's lifetime and a remote one.
struct OpRequest {
  OpKind kind = OpKind::kWrite;
  uint64_t slot = 0;  // the transfer's id, carried by every unit (32 bits on EFA: see fabric/)
  std::shared_ptr<const Region> local;
  RemoteRegion remote;
  std::vector<Segment> segments;
  uint64_t bytes = 0;     // the segments' lengths summed
  bool checksum = false;  // crc32c over the payload too, verified where it lands
};

// Prepare -> post: preparing fixes how many units the target will count before any is sent.
class PreparedOp {
 public:
  virtual ~PreparedOp() = default;
  uint32_t units = 0;
  // Set by the Endpoint between prepare and post, only where caps().carries_begin and units == 1:
  // the encoded BEGIN body, to reach the target ahead of (or with) the op's unit.
  std::string begin;
};

// Upcalls from transport threads into the Endpoint. Must not block for long.
class TransportSink {
 public:
  virtual ~TransportSink() = default;
  // Target: `units` units of transfer `slot` from peer session `peer` are visible in memory.
  virtual void on_arrival(uint64_t peer, uint64_t slot, uint32_t units) = 0;
  // Target: a BEGIN carried by a data unit (see TransportCaps::carries_begin), before the
  // transport reports that unit. Throws ProtocolError if the body is malformed.
  virtual void on_begin(uint64_t peer, const std::string& body) = 0;
  // Target: false once transfer `slot` has failed (deadline, abort, cancel): a transport that
  // can still discard a unit's bytes before they land does so.
  virtual bool accepts(uint64_t peer, uint64_t slot) = 0;
  // Target: a unit of transfer `slot` named a region that is no longer registered; its bytes
  // were discarded and the transfer fails (a race with deregistration, not an attack).
  virtual void on_refused(uint64_t peer, uint64_t slot, const Error& error) = 0;
  // Initiator: `units` units of read `slot` have landed in local memory.
  virtual void on_read_landed(uint64_t slot, uint32_t units) = 0;
  // Initiator: the transport gave up on `slot` (error says why).
  virtual void on_op_failed(uint64_t slot, const Error& error) = 0;
  // A data link of peer session `peer` broke or broke the protocol; the Endpoint fails its work.
  virtual void on_link_failed(uint64_t peer, const Error& error) = 0;
};

// The initiator's data path to one peer.
class DataLink {
 public:
  virtual ~DataLink() = default;
  virtual std::unique_ptr<PreparedOp> prepare(OpRequest op) = 0;
  virtual void post(std::unique_ptr<PreparedOp> op) = 0;
  virtual void close() = 0;
};

struct TransportOptions {
  std::string listen_host = "127.0.0.1";
  int connections = 2;            // parallel connections per peer (TCP)
  std::string provider;           // fabric provider name, empty = best available
  double connect_timeout_s = 5.0;
};

struct TransportContext {
  RegionRegistry& regions;
  TransportSink& sink;
  TransportOptions options;
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual TransportCaps caps() const = 0;
  // Opaque bytes a peer needs to reach this transport (exchanged in the handshake).
  virtual std::string address() const = 0;
  // Prepares a region for remote access; returns the remote key bytes peers must present.
  virtual std::string register_region(const Region& region) = 0;
  virtual void deregister_region(const Region& region) = 0;
  // Target: admit data links that present `token` as peer session `peer`.
  virtual void accept_session(uint64_t peer, uint64_t token) = 0;
  virtual void end_session(uint64_t peer) = 0;
  // Initiator: open the data path to a peer whose address() is `remote_address`.
  virtual std::unique_ptr<DataLink> connect(uint64_t peer, const std::string& remote_address,
                                            uint64_t token) = 0;
  virtual void shutdown() = 0;
  // Target: a thread that waits for a notification reads inbound units itself meanwhile
  // (wait_notification, notifications), so that a message wakes no transport thread (on a VM,
  // an idle vCPU) on its way to the waiter. A transport whose reader_begin() returns true lets
  // that thread read until reader_end(): poll_inbound() handles units already queued, never
  // blocks, and says whether it handled any. A spinning reader calls it in a loop; a sleeping
  // one (`sleeps`, in both calls) calls sleep_inbound() between calls, which blocks until a
  // connection may have bytes for it, `wake_fd` is readable or `timeout_ms` passes, and returns
  // false when the reader should step aside (bulk traffic, which the transport's threads read
  // in parallel).
  virtual bool reader_begin(bool /*sleeps*/) { return false; }
  virtual bool poll_inbound(bool /*sleeps*/) { return false; }
  virtual bool sleep_inbound(int /*wake_fd*/, int /*timeout_ms*/) { return false; }
  virtual void reader_end(bool /*sleeps*/) {}
};

// Name -> factory, so nothing above this layer names a transport.
using TransportFactory = std::function<std::unique_ptr<Transport>(TransportContext)>;
void register_transport(const std::string& name, TransportFactory factory);
std::unique_ptr<Transport> make_transport(const std::string& name, TransportContext ctx);
std::vector<std::string> transport_names();

}  // namespace kvt
