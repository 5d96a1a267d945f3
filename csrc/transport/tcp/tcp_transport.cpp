#include "transport/tcp/tcp_transport.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "transport/tcp/tcp_link.h"
#include "wire/crc32c.h"
#include "wire/data_frame.h"

namespace kvt::tcp {
namespace {

constexpr double kHelloTimeoutS = 5.0;

// A BEGIN frame's shape: no segments, its crc32c announced, a body within the limit.
bool begin_shaped(const wire::DataHeader& h) {
  return h.nseg == 0 && (h.flags & wire::kFlagPayloadCrc) && h.payload <= wire::kMaxBeginBytes;
}

// Throws ProtocolError unless the crc32c that follows a BEGIN frame's body matches it.
void check_begin_crc(const wire::DataHeader& h, const uint8_t* body) {
  if (wire::get_u32_le(body + h.payload) != wire::crc32c(body, h.payload)) {
    fail(ErrorCode::kProtocol, "begin frame of transfer " + std::to_string(h.slot) +
                                   " fails its crc32c: corrupted in flight");
  }
}

void set_recv_timeout(const net::Socket& s, double seconds) {
  struct timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  ::setsockopt(s.fd(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

}  // namespace

TcpTransport::TcpTransport(TransportContext ctx) : ctx_(std::move(ctx)) {
  listener_ = net::listen_tcp(ctx_.options.listen_host, 0);
  address_ = net::local_address(listener_);
  threads_.spawn("kvt-tcp-accept", [this] { accept_loop(); });
}

TcpTransport::~TcpTransport() { shutdown(); }

TransportCaps TcpTransport::caps() const {
  TransportCaps c;
  c.name = "tcp";
  c.rdma_read = true;
  c.ordered = false;  // frames are striped over several connections
  c.software_key_check = true;
  c.carries_begin = true;
  return c;
}

void TcpTransport::accept_session(uint64_t peer, uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_[token] = peer;
}

void TcpTransport::end_session(uint64_t peer) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = tokens_.begin(); it != tokens_.end();) {
    it = it->second == peer ? tokens_.erase(it) : std::next(it);
  }
  for (auto& [_, c] : inbound_) {
    if (c->peer == peer) c->sock.shutdown_both();
  }
}

std::unique_ptr<DataLink> TcpTransport::connect(uint64_t peer, const std::string& remote_address,
                                                uint64_t token) {
  auto hp = net::parse_host_port(remote_address);
  std::vector<net::Socket> sockets;
  int n = std::max(1, ctx_.options.connections);
  for (int i = 0; i < n; ++i) {
    net::Socket s = net::connect_tcp(hp, ctx_.options.connect_timeout_s);
    wire::DataHeader h;
    h.type = wire::DataType::kHello;
    h.slot = token;
    uint8_t buf[wire::kDataHeaderSize];
    wire::encode_data_header(h, nullptr, buf);
    s.send_all(buf, sizeof buf, "TCP data connection to " + remote_address);
    sockets.push_back(std::move(s));
  }
  return std::make_unique<TcpLink>(ctx_.sink, peer, std::move(sockets));
}

void TcpTransport::accept_loop() {
  while (!stopping_.load()) {
    int fd = ::accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // listener shut down
    }
    auto conn = std::make_shared<Inbound>(fd);
    net::set_nodelay(conn->sock);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_.load()) return;
      inbound_[conn.get()] = conn;
    }
    threads_.spawn("kvt-tcp-in", [this, conn] { serve(conn); });
  }
}

void TcpTransport::serve(std::shared_ptr<Inbound> conn) {
  try {
    // Who is this? A connection that does not present a live session token in time is dropped.
    set_recv_timeout(conn->sock, kHelloTimeoutS);
    uint8_t buf[wire::kDataHeaderSize];
    conn->sock.recv_all(buf, sizeof buf, kDataConnection);
    wire::DataHeader h = wire::decode_data_header(buf);
    wire::verify_data_crc(buf, nullptr, 0);
    if (h.type != wire::DataType::kHello || h.nseg != 0) {
      fail(ErrorCode::kProtocol, "TCP data connection did not open with a hello frame");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = tokens_.find(h.slot);
      if (it == tokens_.end()) {
        fail(ErrorCode::kProtocol, "TCP data connection presented an unknown session token");
      }
      conn->peer = it->second;
    }
    set_recv_timeout(conn->sock, 0);
    conn->serving.store(true);
    handover_.joined(conn->io);
    serve_frames(*conn);
  } catch (const Error& e) {
    if (!stopping_.load()) ctx_.sink.on_link_failed(conn->peer, e);
  }
  handover_.left(conn->io);
  {
    std::lock_guard<std::mutex> lock(conn->io.mu);  // a reading waiter reads no more of it
    conn->ended = true;
    conn->landing.region.reset();  // a frame cut short no longer holds up deregistration
  }
  std::lock_guard<std::mutex> lock(mu_);
  inbound_.erase(conn.get());
}

// The connection's own thread: sleeps until bytes come (WaiterReaders::wait), then reads frames
// while any are queued. A reading waiter may have taken them first, hence the peek.
void TcpTransport::serve_frames(Inbound& conn) {
  while (!stopping_.load()) {
    {
      std::lock_guard<std::mutex> lock(conn.io.mu);
      if (conn.ended) return;
      if (conn.landing.active) {  // a reading waiter started it
        land(conn, true);
        continue;
      }
      if (conn.staged.size() > 0) {  // a reading waiter took these bytes off the socket
        serve_frame(conn, true);
        continue;
      }
      uint8_t byte;
      ssize_t r = ::recv(conn.sock.fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
      // A clean close between frames is the peer going away, not an error: its control
      // connection reports that.
      if (r == 0) return;
      if (r > 0) {
        handover_.took(conn.io);
        serve_frame(conn, true);
        continue;
      }
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        fail(ErrorCode::kTransport, "TCP data connection failed while waiting for a frame: " +
                                        std::string(std::strerror(errno)));
      }
      conn.io.handoff.store(false);  // drained: a reading waiter may read it again
    }
    handover_.wait(conn.io, stopping_);
  }
}

bool TcpTransport::reader_begin(bool sleeps) {
  handover_.begin(sleeps);
  return true;
}

// Bytes a waiter staged and left behind (frames that came after the one it waited for) are
// handed to the connection's thread: its socket may hold nothing more to wake it for them.
void TcpTransport::reader_end(bool sleeps) {
  handover_.end(sleeps);
  std::vector<std::shared_ptr<Inbound>> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [_, c] : inbound_) conns.push_back(c);
  }
  for (auto& c : conns) {
    // Held: by its thread, which takes staged bytes before it sleeps, or by another waiter,
    // whose own end comes here.
    std::unique_lock<std::mutex> lock(c->io.mu, std::try_to_lock);
    if (lock.owns_lock() && !c->ended && c->staged.size() > 0) handover_.hand_back(c->io);
  }
}

// `len` bytes of the connection: those a waiter staged first, then the socket's.
void TcpTransport::read_exact(Inbound& conn, void* data, size_t len) {
  struct iovec rest{data, len};
  if (conn.staged.fill(&rest, 1, 0) == 0) {
    conn.sock.recv_all(rest.iov_base, rest.iov_len, kDataConnection);
  }
}

// A connection handed back carries bulk traffic (or is failing): its thread reads it, and the
// waiter sleeps on its notification queue rather than wake for every frame only to hand it on.
bool TcpTransport::sleep_inbound(int wake_fd, int timeout_ms) {
  return handover_.sleep_on(mu_, stopping_, inbound_, wake_fd, timeout_ms);
}

namespace {
// A frame partly queued for longer than this is left to the connection's thread.
constexpr auto kWaiterPartialWait = std::chrono::microseconds(200);
// A waiter's first peek: a BEGIN with a short notification and a small write's head. Longer
// heads (up to a BEGIN and a write head, ~8 KiB) are peeked again at their length, up to the
// most one call takes: a run of BEGIN frames is taken in several calls, not re-peeked ever
// further (each peek copies from the start).
constexpr size_t kFirstPeekBytes = 1024;
constexpr size_t kMaxPeekBytes = 16u << 10;
}  // namespace

// Walks the frame heads at the front of what a reading waiter took or peeked: acts on each
// BEGIN frame, stops at the first small write whose head (header and segments) is complete.
// `have(end)` returns the bytes' start once [0, end) of them are at hand, else null (it may
// fetch more, moving them). Read requests (their replies may block), malformed heads (the
// thread reports them) and large frames are the connection's thread's.
template <class Have>
TcpTransport::Heads TcpTransport::walk_heads(Inbound& conn, Have have) {
  Heads out;
  size_t& off = out.taken;
  while (!out.write) {
    const uint8_t* buf = have(off + wire::kDataHeaderSize);
    if (buf == nullptr) return out;  // kPartial
    wire::DataHeader h;
    try {
      h = wire::decode_data_header(buf + off);
    } catch (const Error&) {
      out.stop = Queued::kNotForWaiter;
      return out;
    }
    if (h.type == wire::DataType::kBegin && begin_shaped(h)) {
      const size_t end = off + wire::kDataHeaderSize + h.payload + 4;
      if ((buf = have(end)) == nullptr) return out;
      const uint8_t* head = buf + off;
      wire::verify_data_crc(head, nullptr, 0);
      const uint8_t* body = head + wire::kDataHeaderSize;
      check_begin_crc(h, body);
      ctx_.sink.on_begin(conn.peer, std::string(reinterpret_cast<const char*>(body), h.payload));
      off = end;
    } else if (h.type == wire::DataType::kWrite && h.nseg <= kMaxSegsPerFrame &&
               h.payload <= kWaiterFrameBytes) {
      const size_t end = off + wire::kDataHeaderSize + size_t{h.nseg} * wire::kDataDescSize;
      if ((buf = have(end)) == nullptr) return out;
      const uint8_t* head = buf + off;
      conn.descs.resize(h.nseg);
      wire::decode_descs(head + wire::kDataHeaderSize, h.nseg, conn.descs.data());
      wire::verify_data_crc(head, conn.descs.data(), h.nseg);
      off = end;
      out.write = true;
      out.h = h;
    } else {
      out.stop = Queued::kNotForWaiter;
      return out;
    }
  }
  return out;
}

// A spinning waiter stages: it reads as bytes arrive, while the sender's sendmsg is still in
// the kernel, where a second receive costs most. A sleeping one wakes after the sender is done,
// and a copy out of the stage would be all that staging changed for it: it peeks. Bytes staged
// already are read first, by either.
TcpTransport::Queued TcpTransport::take_queued(Inbound& conn, bool sleeps) {
  if (conn.staged.size() > 0 || !(sleeps || conn.peeks)) return take_staged(conn);
  return take_peeked(conn);
}

// Takes what is queued on `conn` in one receive into its StagedBytes: the BEGIN and heads of a
// small notified write and its payload, which is then copied into place (the rest of a larger
// one is received into place by land()). What follows the frame it takes stays staged for the
// next reader of the connection.
TcpTransport::Queued TcpTransport::take_staged(Inbound& conn) {
  auto& staged = conn.staged;
  bool received = false;
  auto receive = [&] {
    received = true;
    return staged.receive_now(conn.sock, kDataConnection);
  };
  if (staged.size() == 0) {
    ssize_t r = receive();
    if (r < 0) return Queued::kNotForWaiter;  // end of file: its thread sees it
    if (r == 0) return Queued::kNothing;
  }
  Heads heads = walk_heads(conn, [&](size_t end) -> const uint8_t* {
    // A head staged in part by an earlier look: its rest may have come since.
    if (end > staged.size() && !received && end <= StagedBytes::kCapacity) receive();
    return end <= staged.size() ? staged.data() : nullptr;
  });
  if (heads.taken == 0) return heads.stop;
  if (!heads.write) {  // BEGIN frames only: they were acted on
    staged.consume(heads.taken);
    return Queued::kTaken;
  }
  start_landing(conn, heads.h);  // key and bounds checked before a byte lands
  staged.consume(heads.taken);
  auto& l = conn.landing;
  l.first = staged.fill(l.left.data(), l.left.size(), 0);
  if (l.first < l.left.size()) return Queued::kTaken;  // the rest comes later: land()
  landed(conn);
  return Queued::kLanded;
}

// Takes the frames queued on `conn` that a reading waiter may read without blocking, leaving
// anything else on the socket: a peek shows the frame heads queued, and one recvmsg takes
// those heads and a small write's payload, landing it in place as far as it has come (land()
// takes the rest). For connections that carry bulk traffic (Inbound::peeks).
TcpTransport::Queued TcpTransport::take_peeked(Inbound& conn) {
  auto& buf = conn.peeked;
  size_t asked = 0, got = 0;
  auto peek = [&](size_t n) {
    if (buf.size() < n) buf.resize(n);
    asked = n;
    ssize_t r = ::recv(conn.sock.fd(), buf.data(), n, MSG_PEEK | MSG_DONTWAIT);
    got = r > 0 ? static_cast<size_t>(r) : 0;
    return r;
  };
  ssize_t r = peek(kFirstPeekBytes);
  if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? Queued::kNothing : Queued::kNotForWaiter;
  if (r == 0) return Queued::kNotForWaiter;
  // Peeks again, further, when the first peek was too short for a head.
  Heads heads = walk_heads(conn, [&](size_t end) -> const uint8_t* {
    if (end > got && got == asked && end <= kMaxPeekBytes) peek(end);
    return end <= got ? buf.data() : nullptr;
  });
  if (heads.taken == 0) return heads.stop;
  conn.peeks = false;  // a small frame: the next look stages again
  if (!heads.write) {  // BEGIN frames only: they were acted on, so they are taken off the socket
    conn.sock.recv_all(buf.data(), heads.taken, kDataConnection);
    return Queued::kTaken;
  }
  start_landing(conn, heads.h);  // key and bounds checked before a byte lands
  auto& l = conn.landing;
  auto& iov = conn.iov;
  iov.assign(1, iovec{buf.data(), heads.taken});
  iov.insert(iov.end(), l.left.begin(), l.left.end());
  const size_t first = conn.sock.recvv_now(iov.data(), iov.size(), 0, kDataConnection);
  if (first == 0) fail(ErrorCode::kTransport, kDataConnection + " lost frame bytes it had queued");
  l.first = first - 1;
  if (l.first < l.left.size()) {
    l.left[l.first] = iov[first];  // partly filled: the rest comes later
    return Queued::kTaken;
  }
  landed(conn);
  return Queued::kLanded;
}

// Returns as soon as a write has landed whole: the waiter looks for its notification before
// this peeks at any socket again (a system call on the latency path). The next call starts at
// the following connection, so that a busy one cannot starve the others.
bool TcpTransport::poll_inbound(bool sleeps) {
  std::vector<std::shared_ptr<Inbound>> conns;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_.load()) return false;
    conns.reserve(inbound_.size());
    for (auto& [_, c] : inbound_) {
      if (c->serving.load(std::memory_order_acquire)) conns.push_back(c);
    }
  }
  bool handled = false;
  WaiterReaders::Readable readable;
  handover_.readable(readable, conns.size());
  const size_t start = conns.empty() ? 0 : poll_start_.load(std::memory_order_relaxed) % conns.size();
  for (size_t k = 0; k < conns.size(); ++k) {
    auto& c = conns[(start + k) % conns.size()];
    std::unique_lock<std::mutex> lock(c->io.mu, std::try_to_lock);
    if (!lock.owns_lock() || c->ended || c->io.handoff.load()) continue;
    // Nothing new on its socket and nothing staged: nothing to take (a landing whose rest has
    // not come waits for its socket to be readable).
    if (c->staged.size() == 0 && !readable.has(c->io)) continue;
    try {
      while (true) {
        auto& l = c->landing;
        Queued q = l.active ? Queued::kPartial : take_queued(*c, sleeps);
        if (q == Queued::kLanded || (q == Queued::kPartial && l.active && land(*c, false))) {
          handover_.took(c->io);
          c->partial_since = {};
          poll_start_.store(start + k + 1, std::memory_order_relaxed);
          return true;
        }
        if (q == Queued::kTaken) {
          handover_.took(c->io);
          handled = true;
          if (!l.active) c->partial_since = {};
          continue;
        }
        if (q == Queued::kPartial) {
          auto now = std::chrono::steady_clock::now();
          if (c->partial_since == std::chrono::steady_clock::time_point{}) c->partial_since = now;
          if (now - c->partial_since < kWaiterPartialWait) break;  // the rest is on its way
        }
        if (q == Queued::kNotForWaiter) c->peeks = true;
        if (q != Queued::kNothing) handover_.hand_back(c->io);
        c->partial_since = {};
        break;
      }
    } catch (const Error& e) {
      // Ended here, reported here: the connection's thread sees `ended` and leaves quietly.
      // Reported before the socket is shut: a peer that sees it shut may close its session,
      // and the failure of a peer already gone is not recorded (a hostile frame's went
      // unrecorded when this waiter lost the core in between).
      c->ended = true;
      if (!stopping_.load()) ctx_.sink.on_link_failed(c->peer, e);
      c->sock.shutdown_both();
      handover_.hand_back(c->io);
    }
  }
  return handled;
}

// Reads and acts on one frame. Its head must be queued or `wait` true: a write frame's payload
// is then landed as far as it has come (all of it when `wait`), the rest by land().
void TcpTransport::serve_frame(Inbound& conn, bool wait) {
  uint8_t header[wire::kDataHeaderSize];
  auto& descs = conn.descs;
  auto& raw = conn.raw;
  auto& iov = conn.iov;
  struct iovec rest{header, sizeof header};
  if (conn.staged.fill(&rest, 1, 0) == 0) {
    ssize_t r = ::recv(conn.sock.fd(), rest.iov_base, rest.iov_len, MSG_WAITALL);
    if (r != static_cast<ssize_t>(rest.iov_len)) {
      if (r >= 0) fail(ErrorCode::kProtocol, "TCP data connection closed inside a frame header");
      fail(ErrorCode::kTransport, "TCP data connection failed while reading a frame header");
    }
  }
  wire::DataHeader h = wire::decode_data_header(header);
  raw.resize(static_cast<size_t>(h.nseg) * wire::kDataDescSize);
  read_exact(conn, raw.data(), raw.size());
  descs.resize(h.nseg);
  wire::decode_descs(raw.data(), h.nseg, descs.data());
  wire::verify_data_crc(header, descs.data(), h.nseg);

  if (h.type == wire::DataType::kBegin) {
    if (!begin_shaped(h)) {
      fail(ErrorCode::kProtocol, "begin frame of " + std::to_string(h.payload) +
                                     " bytes, with segments or without its crc32c");
    }
    std::string body(h.payload + 4, '\0');  // the body and its crc32c, in one receive
    read_exact(conn, body.data(), body.size());
    check_begin_crc(h, reinterpret_cast<const uint8_t*>(body.data()));
    body.resize(h.payload);
    ctx_.sink.on_begin(conn.peer, body);
  } else if (h.type == wire::DataType::kWrite) {
    start_landing(conn, h);
    land(conn, wait);
  } else if (h.type == wire::DataType::kReadReq) {
    wire::DataHeader reply;
    reply.slot = h.slot;
    reply.frame = h.frame;
    std::string refusal;
    std::shared_ptr<const Region> region;
    iov.clear();
    try {
      region = ctx_.regions.check(h.region, h.key, Access::kRemoteRead);
      for (const auto& d : descs) {
        if (!in_bounds(d.off, d.len, region->nbytes)) {
          fail(ErrorCode::kProtocol, "read of [" + std::to_string(d.off) + ", +" +
                                         std::to_string(d.len) + ") outside region " +
                                         std::to_string(h.region));
        }
        reply.payload += d.len;
        iov.push_back(iovec{region->base + d.off, d.len});
      }
    } catch (const Error& e) {
      refusal = std::string(e.what()).substr(0, wire::kMaxReadErrBytes);
    }
    uint8_t out[wire::kDataHeaderSize];
    uint8_t crc_le[4];
    if (refusal.empty() && (h.flags & wire::kFlagPayloadCrc)) {
      reply.flags = wire::kFlagPayloadCrc;
      wire::put_u32_le(crc_le, wire::crc32c_iov(iov.data(), iov.size()));
      iov.push_back(iovec{crc_le, 4});
    }
    if (!refusal.empty()) {
      reply.type = wire::DataType::kReadErr;
      reply.payload = refusal.size();
      iov.assign(1, iovec{refusal.data(), refusal.size()});
    } else {
      reply.type = wire::DataType::kReadResp;
    }
    wire::encode_data_header(reply, nullptr, out);
    iov.insert(iov.begin(), iovec{out, sizeof out});
    conn.sock.sendv_all(iov.data(), iov.size(), kDataConnection);
  } else {
    fail(ErrorCode::kProtocol, "unexpected data frame type " +
                                   std::to_string(static_cast<int>(h.type)) + " at the target");
  }
}

// Checks a write frame's head (key, bounds, sizes) and says where its payload goes: into the
// region, or, for a transfer that already failed or a region deregistered meanwhile, away.
void TcpTransport::start_landing(Inbound& conn, const wire::DataHeader& h) {
  using Then = Inbound::Landing::Then;
  auto& l = conn.landing;
  l.h = h;
  l.left.clear();
  l.first = 0;
  const bool crc = h.flags & wire::kFlagPayloadCrc;
  const bool accepted = ctx_.sink.accepts(conn.peer, h.slot);
  // Held until the payload has landed: deregistration waits for it, even when a reading waiter
  // leaves the rest of the frame to the connection's thread.
  l.region = accepted ? ctx_.regions.find(h.region) : nullptr;
  if (!l.region) {
    // Failed or cancelled: never land late bytes. Deregistered: the transfer fails.
    l.then = accepted ? Then::kRefuseGone : Then::kForget;
    l.sink.resize(std::min<uint64_t>(h.payload + 4, 1 << 20));
    for (uint64_t left = h.payload + (crc ? 4 : 0); left > 0;) {
      uint64_t n = std::min<uint64_t>(left, l.sink.size());
      l.left.push_back(iovec{l.sink.data(), n});
      left -= n;
    }
    l.active = true;
    return;
  }
  const Region* region = l.region.get();
  RegionRegistry::check_access(*region, h.key, Access::kRemoteWrite);
  uint64_t total = 0;
  for (const auto& d : conn.descs) {
    if (!in_bounds(d.off, d.len, region->nbytes)) {
      fail(ErrorCode::kProtocol, "write of [" + std::to_string(d.off) + ", +" +
                                     std::to_string(d.len) + ") outside region " +
                                     std::to_string(h.region) + " of " +
                                     std::to_string(region->nbytes) + " bytes");
    }
    total += d.len;
    l.left.push_back(iovec{region->base + d.off, d.len});
  }
  if (total != h.payload) {
    fail(ErrorCode::kProtocol, "write frame announces " + std::to_string(h.payload) +
                                   " payload bytes but its segments sum to " +
                                   std::to_string(total));
  }
  if (crc) {
    l.places = l.left;  // receiving consumes `left`
    l.left.push_back(iovec{l.crc_le, 4});
  }
  l.then = Then::kArrive;
  l.active = true;
}

// Receives the rest of the landing frame (all of it when `wait`, else what is queued); true
// once it is complete and acted on.
bool TcpTransport::land(Inbound& conn, bool wait) {
  auto& l = conn.landing;
  l.first = conn.staged.fill(l.left.data(), l.left.size(), l.first);
  if (wait) {
    conn.sock.recvv_all(l.left.data() + l.first, l.left.size() - l.first, kDataConnection);
    l.first = l.left.size();
  } else {
    l.first = conn.sock.recvv_now(l.left.data(), l.left.size(), l.first, kDataConnection);
    if (l.first < l.left.size()) return false;
  }
  landed(conn);
  return true;
}

// The landing frame's every byte came: says so (or why it failed) to the Endpoint.
void TcpTransport::landed(Inbound& conn) {
  using Then = Inbound::Landing::Then;
  auto& l = conn.landing;
  l.active = false;
  l.region.reset();
  const wire::DataHeader& h = l.h;
  if (l.then == Then::kForget) return;
  if (l.then == Then::kRefuseGone) {
    ctx_.sink.on_refused(conn.peer, h.slot,
                         Error(ErrorCode::kInvalidRequest,
                               "region " + std::to_string(h.region) +
                                   " was deregistered while the transfer was in flight"));
    return;
  }
  if ((h.flags & wire::kFlagPayloadCrc) &&
      wire::get_u32_le(l.crc_le) != wire::crc32c_iov(l.places.data(), l.places.size())) {
    ctx_.sink.on_refused(conn.peer, h.slot,
                         Error(ErrorCode::kProtocol,
                               "payload of transfer " + std::to_string(h.slot) + " (frame " +
                                   std::to_string(h.frame) + ") fails its crc32c: corrupted in flight"));
    return;
  }
  ctx_.sink.on_arrival(conn.peer, h.slot, 1);
}

void TcpTransport::shutdown() {
  if (stopping_.exchange(true)) return;
  listener_.shutdown_both();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [_, c] : inbound_) c->sock.shutdown_both();
  }
  handover_.stop();
  threads_.join_all();
}

}  // namespace kvt::tcp
