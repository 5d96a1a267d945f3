// cma: the same-host transport. The initiator copies straight between the two processes' memory
// with process_vm_writev / process_vm_readv (cross-memory attach: one copy, no socket in the
// data path); a unix socket carries the session set-up and "transfer S landed" records, and the
// target's regions are published in shared memory so the initiator can check key, permission
// and bounds before it touches anything (cma_region_table.h). Design notes: docs/transports.md.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/thread_set.h"
#include "net/socket.h"
#include "transport/cma/cma_channel.h"
#include "transport/cma/cma_region_table.h"
#include "transport/waiter_readers.h"
#include "transport/transport.h"

namespace kvt::cma {

class CmaTransport : public Transport {
 public:
  explicit CmaTransport(TransportContext ctx);
  ~CmaTransport() override;

  TransportCaps caps() const override;
  std::string address() const override { return address_; }
  std::string register_region(const Region& region) override;
  void deregister_region(const Region& region) override;
  void accept_session(uint64_t peer, uint64_t token) override;
  void end_session(uint64_t peer) override;
  std::unique_ptr<DataLink> connect(uint64_t peer, const std::string& remote_address,
                                    uint64_t token) override;
  void shutdown() override;
  bool reader_begin(bool sleeps) override;
  bool poll_inbound(bool sleeps) override;
  bool sleep_inbound(int wake_fd, int timeout_ms) override;
  void reader_end(bool sleeps) override;

 private:
  // One initiator's session with us: its socket and the busy board it marks accesses on.
  struct Session {
    explicit Session(int fd) : sock(fd), io(fd) {}
    net::Socket sock;
    WaiterReaders::Reader io;  // io.mu: one reader at a time, its thread or a reading waiter
    uint64_t peer = 0;
    std::unique_ptr<BusyBoard> board;
    std::unique_ptr<ArrivalRing> ring;  // in the board; read under io.mu
    std::atomic<bool> serving{false};  // past its hello: records may be read by any thread
    std::atomic<bool> gone{false};  // the initiator closed its end: it copies nothing more
    std::optional<Error> failure;   // under io.mu: what a reading waiter met, for its thread
    bool socket_skipped = false;    // under io.mu: the last poll took ring arrivals only
  };
  void accept_loop();
  void serve(std::shared_ptr<Session> s);
  void serve_records(Session& s);
  void handle_record(Session& s, Msg& m);
  void arrived(Session& s, uint64_t slot, uint32_t units, const std::string& begin);
  bool take_arrivals(Session& s);  // under s.io.mu
  void set_polled(bool on);
  // Waits until no live session accesses `slot`; false (naming who) when the deadline passes.
  bool drain(uint32_t slot, double timeout_s, std::string& holder);

  TransportContext ctx_;
  RegionTable table_;
  net::Socket listener_;
  std::string address_;
  std::mutex mu_;  // table_, slots_, tokens_, sessions_, spinners_
  int spinners_ = 0;  // reading waiters that spin (not sleeping ones): the rings are polled
  std::unordered_map<uint32_t, uint32_t> slots_;    // region id -> table slot
  std::unordered_map<uint64_t, uint64_t> tokens_;   // session token -> peer
  std::unordered_map<Session*, std::shared_ptr<Session>> sessions_;
  std::atomic<bool> stopping_{false};
  std::atomic<size_t> poll_start_{0};  // where the next poll_inbound starts (round robin)
  WaiterReaders handover_;
  ThreadSet threads_;
};

}  // namespace kvt::cma
