// TCP data path: each peer gets `connections` sockets; a transfer is cut into frames of at most
// kMaxFrameBytes / kMaxDescsPerFrame that are striped over them and sent with sendmsg straight
// from registered memory. The target checks every frame's key and bounds before a byte lands,
// then receives the payload with recvmsg straight into place. Threads block in the kernel.
// While a waiter reads for a notification, the connection threads step away from their sockets
// and the waiter reads whole queued frames itself (reader_begin / poll_inbound / sleep_inbound /
// reader_end); a spinning one takes a small write in one receive (StagedBytes).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/thread_set.h"
#include "net/socket.h"
#include "transport/tcp/staged_bytes.h"
#include "transport/waiter_readers.h"
#include "transport/transport.h"
#include "wire/data_frame.h"

namespace kvt::tcp {

constexpr uint64_t kMaxFrameBytes = 2u << 20;
constexpr uint32_t kMaxSegsPerFrame = 256;  // ~128 iovecs per sendmsg is where gains stop
// A reading waiter reads frames up to this size; larger ones are bandwidth traffic that its
// connection's thread reads (they may not fit the receive queue whole, and a wake-up is cheap
// next to them).
constexpr uint64_t kWaiterFrameBytes = 256u << 10;
// What socket errors name. One string made once: the socket calls take a std::string, and a
// literal would build (and allocate) a new one on every receive of a spinning waiter's loop.
inline const std::string kDataConnection = "TCP data connection";

class TcpTransport : public Transport {
 public:
  explicit TcpTransport(TransportContext ctx);
  ~TcpTransport() override;

  TransportCaps caps() const override;
  std::string address() const override { return address_; }
  std::string register_region(const Region&) override { return {}; }
  void deregister_region(const Region&) override {}
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
  struct Inbound {
    explicit Inbound(int fd) : sock(fd), io(fd) {}
    net::Socket sock;
    WaiterReaders::Reader io;  // io.mu: one reader at a time, its thread or a reading waiter
    uint64_t peer = 0;
    std::atomic<bool> serving{false};  // past its hello: frames may be read by any thread
    bool ended = false;  // under io.mu: the connection failed or closed; nobody reads it
    std::chrono::steady_clock::time_point partial_since{};  // under io.mu
    std::vector<wire::DataDesc> descs;
    std::vector<uint8_t> raw;
    std::vector<uint8_t> peeked;  // a reading waiter's copy of the frame heads queued
    StagedBytes staged;  // under io.mu: taken off the socket by a waiter, not yet acted on
    // Under io.mu: a waiter met a frame that is not its to read here (bulk traffic): it peeks
    // at this connection, rather than stage what may be megabytes for the thread to copy,
    // until it takes a small frame here again.
    bool peeks = false;
    std::vector<struct iovec> iov;
    // A write frame whose head was read and checked and whose payload is still coming: a
    // spinning waiter lands what is queued and comes back for the rest, or leaves the rest to
    // the connection's thread. Under io.mu.
    struct Landing {
      enum class Then { kArrive, kForget, kRefuseGone } then = Then::kArrive;
      bool active = false;
      wire::DataHeader h;
      std::vector<struct iovec> left;    // still to come (advanced in place), crc32c last
      size_t first = 0;
      std::vector<struct iovec> places;  // the payload's places, for its crc32c
      uint8_t crc_le[4] = {};
      std::vector<char> sink;            // where discarded bytes go
      std::shared_ptr<const Region> region;  // where the payload lands; null when discarded
    } landing;
  };
  // What a reading waiter found queued: frames it took (kTaken), a write it took and landed
  // whole (kLanded), none, the start of a frame whose head is still coming (kPartial), or a
  // frame that is its thread's (kNotForWaiter).
  enum class Queued { kNothing, kTaken, kLanded, kPartial, kNotForWaiter };
  // The frame heads a reading waiter walked (walk_heads): the BEGIN frames it acted on and,
  // when `write`, a small write's head (h, its segments in Inbound::descs), `taken` bytes in
  // all; else why it stopped.
  struct Heads {
    size_t taken = 0;
    bool write = false;
    Queued stop = Queued::kPartial;
    wire::DataHeader h;
  };

  void accept_loop();
  void serve(std::shared_ptr<Inbound> conn);
  void serve_frames(Inbound& conn);
  void serve_frame(Inbound& conn, bool wait);
  void start_landing(Inbound& conn, const wire::DataHeader& h);
  bool land(Inbound& conn, bool wait);
  void landed(Inbound& conn);
  Queued take_queued(Inbound& conn, bool sleeps);
  Queued take_peeked(Inbound& conn);
  Queued take_staged(Inbound& conn);
  template <class Have>
  Heads walk_heads(Inbound& conn, Have have);
  void read_exact(Inbound& conn, void* data, size_t len);

  TransportContext ctx_;
  net::Socket listener_;
  std::string address_;
  std::mutex mu_;
  std::unordered_map<uint64_t, uint64_t> tokens_;  // session token -> peer
  std::unordered_map<Inbound*, std::shared_ptr<Inbound>> inbound_;
  std::atomic<bool> stopping_{false};
  std::atomic<size_t> poll_start_{0};  // where the next poll_inbound starts (round robin)
  WaiterReaders handover_;
  ThreadSet threads_;
};

}  // namespace kvt::tcp
