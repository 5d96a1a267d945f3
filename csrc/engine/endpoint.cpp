#include "engine/endpoint.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>

#include "auth/hmac_sha256.h"
#include "core/thread_name.h"
#include "net/socket.h"
#include "wire/version.h"

namespace kvt {
namespace {

constexpr double kHandshakeTimeoutS = 5.0;

int64_t monotonic_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

uint64_t random_u64() {
  std::string b = auth::random_bytes(8);
  uint64_t v;
  std::memcpy(&v, b.data(), 8);
  return v;
}

std::string server_proof(const std::string& token, const std::string& cn, const std::string& sn) {
  return auth::hmac_sha256(token, "kvtransfer-server" + cn + sn);
}
std::string client_proof(const std::string& token, const std::string& cn, const std::string& sn) {
  return auth::hmac_sha256(token, "kvtransfer-client" + sn + cn);
}

std::string version_mismatch(uint16_t theirs, const std::string& who) {
  return "incompatible protocol version: " + who + " speaks kvtransfer protocol v" +
         std::to_string(theirs) + ", this endpoint speaks v" +
         std::to_string(wire::kProtocolVersion) + "; upgrade one side";
}

[[noreturn]] void raise_remote(const wire::ErrorMsg& e, const std::string& who) {
  auto code = static_cast<ErrorCode>(e.code);
  if (code < ErrorCode::kInvalidRequest || code > ErrorCode::kProtocol) code = ErrorCode::kProtocol;
  fail(code, who + " refused: " + e.message);
}

ControlMessage expect(ControlChannel& ch, wire::MsgType type, const std::string& who) {
  ControlMessage m = ch.recv();
  if (m.type == wire::MsgType::kError) raise_remote(wire::decode_error(m.body), who);
  if (m.type != type) {
    fail(ErrorCode::kProtocol, who + " sent message type " +
                                   std::to_string(static_cast<int>(m.type)) +
                                   " during the handshake, expected " +
                                   std::to_string(static_cast<int>(type)));
  }
  return m;
}

}  // namespace

thread_local std::vector<Endpoint::OwedAck>* Endpoint::owed_acks_ = nullptr;

Endpoint::Endpoint(EndpointOptions options)
    : options_(std::move(options)), inbound_(options_.timeout_s) {
  if (options_.timeout_s <= 0) {
    fail(ErrorCode::kInvalidRequest, "timeout must be positive, got " + std::to_string(options_.timeout_s));
  }
  auto hp = net::parse_host_port(options_.listen);
  TransportOptions topts;
  topts.listen_host = hp.host;
  topts.connections = options_.connections;
  topts.provider = options_.provider;
  topts.connect_timeout_s = options_.timeout_s;
  if (options_.faults.empty()) {
    transport_ = make_transport(options_.transport, TransportContext{regions_, *this, topts});
  } else {
    auto injector = std::make_unique<fault::FaultInjector>(fault::parse_fault_spec(options_.faults), *this);
    injector->wrap(make_transport(options_.transport, TransportContext{regions_, *injector, topts}));
    transport_ = std::move(injector);
  }
  carries_begin_ = transport_->caps().carries_begin;
  listener_ = net::listen_tcp(hp.host, hp.port);
  address_ = net::local_address(listener_);
  threads_.spawn("kvt-accept", [this] { accept_loop(); });
  watchdog_ = std::thread([this] {
    name_this_thread("kvt-watchdog");
    watchdog_loop();
  });
}

Endpoint::~Endpoint() { close(); }

// ---------------------------------------------------------------- memory

std::shared_ptr<const Region> Endpoint::register_region(uintptr_t addr, uint64_t nbytes,
                                                        bool remote_write, bool remote_read) {
  if (closing_) fail(ErrorCode::kInvalidRequest, "endpoint '" + options_.name + "' is closed");
  auto r = regions_.add(reinterpret_cast<char*>(addr), nbytes, remote_write, remote_read);
  try {
    regions_.publish(r->id, transport_->register_region(*r));
  } catch (...) {
    regions_.remove(r->id, 0);
    throw;
  }
  return regions_.lookup(r->id);
}

void Endpoint::deregister_region(uint32_t id, double timeout_s) {
  std::shared_ptr<const Region> r;
  try {
    r = regions_.lookup(id);
  } catch (const Error&) {
    return;
  }
  Region copy = *r;
  r.reset();
  regions_.remove(id, timeout_s);
  transport_->deregister_region(copy);
  // Peers cache what we expose; tell them now so their next write fails before it is sent.
  std::vector<std::shared_ptr<PeerConn>> inbound;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [_, p] : peers_) {
      if (!p->outbound && !p->dead) inbound.push_back(p);
    }
  }
  const std::string list = wire::encode_regions(regions_.exposed());
  for (const auto& p : inbound) {
    try {
      p->control->send(wire::MsgType::kRegions, list);
    } catch (const Error&) {
      // Its control loop reports the broken connection.
    }
  }
}

std::string Endpoint::info() const {
  wire::EndpointInfo info;
  info.name = options_.name;
  info.address = address_;
  info.transport = transport_->caps().name;
  for (const auto& r : regions_.exposed()) info.regions.emplace_back(r.id, r.nbytes);
  return wire::encode_info(info);
}

// ---------------------------------------------------------------- handshake

std::shared_ptr<PeerConn> Endpoint::connect(const std::string& info_or_address, double timeout_s) {
  if (closing_) fail(ErrorCode::kInvalidRequest, "endpoint '" + options_.name + "' is closed");
  std::string address = info_or_address;
  if (info_or_address.size() >= 4) {
    uint32_t magic;
    std::memcpy(&magic, info_or_address.data(), 4);
    if (magic == wire::kInfoMagic) address = wire::decode_info(info_or_address).address;
  }
  auto peer = std::make_shared<PeerConn>();
  peer->id = next_peer_++;
  peer->outbound = true;
  peer->address = address;
  net::Socket s = net::connect_tcp(net::parse_host_port(address), timeout_s);
  peer->control = std::make_unique<ControlChannel>(std::move(s), "control connection to " + address);
  peer->control->set_timeouts(timeout_s, timeout_s);
  handshake_as_client(*peer);
  peer->control->set_timeouts(0, options_.timeout_s);
  reap_dead_peers();
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers_[peer->id] = peer;
  }
  stats_.peers++;
  threads_.spawn("kvt-control", [this, peer] { serve_peer(peer, false); });
  return peer;
}

void Endpoint::handshake_as_client(PeerConn& peer) {
  ControlChannel& ch = *peer.control;
  const std::string who = "peer at " + peer.address;
  wire::Hello hello{wire::kProtocolVersion, options_.name, auth::random_bytes(16),
                    static_cast<uint64_t>(monotonic_ns())};
  ch.send(wire::MsgType::kHello, wire::encode(hello));
  auto ch_msg = wire::decode_challenge(expect(ch, wire::MsgType::kChallenge, who).body);
  peer.name = ch_msg.name;
  const std::string who2 = "peer '" + peer.name + "' at " + peer.address;
  if (ch_msg.version != wire::kProtocolVersion) {
    std::string msg = version_mismatch(ch_msg.version, who2);
    ch.send(wire::MsgType::kError,
            wire::encode(wire::ErrorMsg{static_cast<uint32_t>(ErrorCode::kProtocol), msg}));
    fail(ErrorCode::kProtocol, msg);
  }
  const std::string& token = options_.auth_token;
  if (ch_msg.auth_required != !token.empty()) {
    std::string msg = ch_msg.auth_required
                          ? who2 + " requires an auth_token and this endpoint has none"
                          : "this endpoint requires an auth_token but " + who2 + " has none";
    ch.send(wire::MsgType::kError,
            wire::encode(wire::ErrorMsg{static_cast<uint32_t>(ErrorCode::kAuthentication), msg}));
    fail(ErrorCode::kAuthentication, msg);
  }
  std::string proof = token.empty() ? "" : client_proof(token, hello.nonce, ch_msg.nonce);
  ch.send(wire::MsgType::kAuth, wire::encode_bytes(proof));
  if (!token.empty() &&
      !auth::constant_time_equal(ch_msg.proof, server_proof(token, hello.nonce, ch_msg.nonce))) {
    fail(ErrorCode::kAuthentication,
         who2 + " failed authentication: its auth_token differs from this endpoint's");
  }
  auto welcome = wire::decode_welcome(expect(ch, wire::MsgType::kWelcome, who2).body);
  const std::string ours = transport_->caps().name;
  if (welcome.transport != ours) {
    fail(ErrorCode::kProtocol, who2 + " uses transport '" + welcome.transport +
                                   "', this endpoint '" + ours + "'; both sides must use the same");
  }
  for (auto& r : welcome.regions) peer.regions[r.id] = r;
  peer.link = transport_->connect(peer.id, welcome.address, welcome.token);
}

void Endpoint::handshake_as_server(PeerConn& peer) {
  ControlChannel& ch = *peer.control;
  auto hello_msg = ch.recv();
  if (hello_msg.type != wire::MsgType::kHello) {
    fail(ErrorCode::kProtocol, "a connection from " + peer.address + " did not start with HELLO");
  }
  if (hello_msg.version != wire::kProtocolVersion) {
    std::string msg = version_mismatch(hello_msg.version, "peer at " + peer.address);
    ch.send(wire::MsgType::kError,
            wire::encode(wire::ErrorMsg{static_cast<uint32_t>(ErrorCode::kProtocol), msg}));
    fail(ErrorCode::kProtocol, msg);
  }
  auto hello = wire::decode_hello(hello_msg.body);
  peer.name = hello.name;
  if (hello.clock_ns != 0) {
    peer.has_clock_offset = true;
    peer.clock_offset_ns = monotonic_ns() - static_cast<int64_t>(hello.clock_ns);
  }
  const std::string who = "peer '" + peer.name + "' at " + peer.address;
  if (hello.version != wire::kProtocolVersion) {
    std::string msg = version_mismatch(hello.version, who);
    ch.send(wire::MsgType::kError,
            wire::encode(wire::ErrorMsg{static_cast<uint32_t>(ErrorCode::kProtocol), msg}));
    fail(ErrorCode::kProtocol, msg);
  }
  const std::string& token = options_.auth_token;
  wire::Challenge challenge{wire::kProtocolVersion, options_.name, auth::random_bytes(16),
                            !token.empty(), ""};
  if (!token.empty()) challenge.proof = server_proof(token, hello.nonce, challenge.nonce);
  ch.send(wire::MsgType::kChallenge, wire::encode(challenge));
  auto auth_msg = expect(ch, wire::MsgType::kAuth, who);
  std::string proof = wire::decode_bytes(auth_msg.body, 64);
  if (!token.empty() &&
      !auth::constant_time_equal(proof, client_proof(token, hello.nonce, challenge.nonce))) {
    std::string msg = who + " failed authentication: wrong auth_token";
    ch.send(wire::MsgType::kError,
            wire::encode(wire::ErrorMsg{static_cast<uint32_t>(ErrorCode::kAuthentication),
                                        "authentication failed: wrong auth_token"}));
    fail(ErrorCode::kAuthentication, msg);
  }
  wire::Welcome welcome;
  welcome.token = random_u64();
  welcome.transport = transport_->caps().name;
  welcome.address = transport_->address();
  welcome.regions = regions_.exposed();
  transport_->accept_session(peer.id, welcome.token);
  ch.send(wire::MsgType::kWelcome, wire::encode(welcome));
}

void Endpoint::accept_loop() {
  while (!closing_) {
    int fd = ::accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;
    }
    auto peer = std::make_shared<PeerConn>();
    peer->id = next_peer_++;
    net::Socket s(fd);
    net::set_nodelay(s);
    peer->address = net::local_address(s);  // replaced by the peer's name after HELLO
    struct sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      char host[64] = {0};
      if (ss.ss_family == AF_INET) {
        auto* a = reinterpret_cast<sockaddr_in*>(&ss);
        ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        peer->address = std::string(host) + ":" + std::to_string(ntohs(a->sin_port));
      }
    }
    peer->control = std::make_unique<ControlChannel>(std::move(s), "control connection from " + peer->address);
    reap_dead_peers();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closing_) return;
      peers_[peer->id] = peer;
    }
    threads_.spawn("kvt-control", [this, peer] { serve_peer(peer, true); });
  }
}

// ---------------------------------------------------------------- control loop

void Endpoint::serve_peer(std::shared_ptr<PeerConn> peer, bool handshake) {
  try {
    if (handshake) {
      // A client that connects and stays silent is dropped after the handshake timeout.
      peer->control->set_timeouts(kHandshakeTimeoutS, kHandshakeTimeoutS);
      handshake_as_server(*peer);
      peer->control->set_timeouts(0, options_.timeout_s);
      stats_.peers++;
    }
    while (!closing_ && !peer->dead) handle(*peer, peer->control->recv());
  } catch (const Error& e) {
    if (!closing_) {
      bool clean = std::strstr(e.what(), "closed by peer") != nullptr;
      peer_failed(peer->id, clean ? Error(ErrorCode::kTransport,
                                          "peer '" + peer->name + "' (" + peer->address +
                                              ") closed the connection")
                                  : e);
    }
  }
}

void Endpoint::handle(PeerConn& peer, const ControlMessage& m) {
  using wire::MsgType;
  if (m.version != wire::kProtocolVersion) {
    fail(ErrorCode::kProtocol, version_mismatch(m.version, "peer '" + peer.name + "'"));
  }
  switch (m.type) {
    case MsgType::kBegin:
      begin_inbound(peer, m.body);
      break;
    case MsgType::kAck: {
      auto ack = wire::decode_ack(m.body);
      if (ack.code == 0) {
        finish_transfer(ack.slot, TransferStatus::kDone, ErrorCode::kTransport, "");
      } else {
        auto code = static_cast<ErrorCode>(ack.code);
        if (code < ErrorCode::kInvalidRequest || code > ErrorCode::kProtocol) code = ErrorCode::kTransport;
        finish_transfer(ack.slot, TransferStatus::kError, code,
                        "peer '" + peer.name + "' failed the transfer: " + ack.message);
      }
      break;
    }
    case MsgType::kAbort: {
      auto [slot, reason] = wire::decode_slot_bytes(m.body, 4096);
      if (auto o = inbound_.abort(peer.id, slot, ErrorCode::kTransport,
                                  "the initiator aborted it: " + reason)) {
        settle(std::move(*o));
      }
      break;
    }
    case MsgType::kNotify: {
      auto [slot, payload] = wire::decode_slot_bytes(m.body, wire::kMaxNotify);
      notifications_.push(Notification{peer.name, payload, false, "", ErrorCode::kTransport});
      stats_.inbound_done++;
      peer.control->send(MsgType::kAck, wire::encode(wire::Ack{slot, 0, ""}));
      break;
    }
    case MsgType::kRegionsReq:
      peer.control->send(MsgType::kRegions, wire::encode_regions(regions_.exposed()));
      break;
    case MsgType::kRegions: {
      auto list = wire::decode_regions(m.body);
      {
        std::lock_guard<std::mutex> lock(peer.mu);
        peer.regions.clear();
        for (auto& r : list) peer.regions[r.id] = r;
        peer.regions_version++;
      }
      peer.cv.notify_all();
      break;
    }
    case MsgType::kError:
      raise_remote(wire::decode_error(m.body), "peer '" + peer.name + "'");
    default:
      fail(ErrorCode::kProtocol, "peer '" + peer.name + "' sent handshake message type " +
                                     std::to_string(static_cast<int>(m.type)) + " after the handshake");
  }
}

// The target's verdict on one inbound transfer: notify (or report the failure), then tell the
// initiator, who reports DONE only now.
void Endpoint::settle(InboundOutcome o) {
  OwedAck ack{o.peer, wire::Ack{o.slot, o.ok ? 0u : static_cast<uint32_t>(o.code), o.error}};
  if (o.ok) {
    stats_.inbound_done++;
  } else {
    stats_.inbound_failed++;
  }
  if (o.has_notify) {
    notifications_.push(Notification{std::move(o.peer_name), std::move(o.payload), !o.ok,
                                     std::move(o.error), o.ok ? ErrorCode::kTransport : o.code});
  }
  if (owed_acks_) {  // a reading waiter settled it: see WaitingReader
    owed_acks_->push_back(std::move(ack));
    return;
  }
  send_ack(ack);
}

void Endpoint::send_ack(const OwedAck& a) {
  auto peer = find_peer(a.peer);
  if (!peer || peer->dead) return;
  try {
    peer->control->send(wire::MsgType::kAck, wire::encode(a.ack));
  } catch (const Error&) {
    // The control loop reports the broken connection.
  }
}

void Endpoint::send_acks(std::vector<OwedAck>& acks) {
  for (const auto& a : acks) send_ack(a);
  acks.clear();
}

void Endpoint::begin_inbound(PeerConn& peer, const std::string& body) {
  auto begin = wire::decode_begin(body);
  auto deadline = Clock::now() + std::chrono::milliseconds(begin.deadline_ms);
  if (peer.has_clock_offset && begin.start_ns != 0) {
    int64_t start_here = static_cast<int64_t>(begin.start_ns) + peer.clock_offset_ns;
    deadline = Clock::time_point(std::chrono::nanoseconds(start_here)) +
               std::chrono::milliseconds(begin.deadline_ms);
  }
  auto o = inbound_.begin(peer.id, peer.name, begin, deadline);
  add_pending();
  if (o) settle(std::move(*o));
}

void Endpoint::on_begin(uint64_t peer_id, const std::string& body) {
  if (auto peer = find_peer(peer_id)) begin_inbound(*peer, body);
}

// ---------------------------------------------------------------- transfers

RemoteRegion Endpoint::remote_region(PeerConn& peer, uint32_t id, double timeout_s) {
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    auto it = peer.regions.find(id);
    if (it != peer.regions.end()) return it->second;
  }
  peer_regions(peer, timeout_s);  // it may have registered the region after we connected
  std::lock_guard<std::mutex> lock(peer.mu);
  auto it = peer.regions.find(id);
  if (it == peer.regions.end()) {
    std::string have;
    for (const auto& [rid, r] : peer.regions) have += (have.empty() ? "" : ", ") + std::to_string(rid);
    fail(ErrorCode::kInvalidRequest, "peer '" + peer.name + "' exposes no region " +
                                         std::to_string(id) + " (it exposes: " +
                                         (have.empty() ? "none" : have) + ")");
  }
  return it->second;
}

std::map<uint32_t, uint64_t> Endpoint::peer_regions(PeerConn& peer, double timeout_s) {
  if (peer.dead) fail(ErrorCode::kTransport, "peer '" + peer.name + "' is gone: " + peer.death);
  uint64_t seen;
  {
    std::lock_guard<std::mutex> lock(peer.mu);
    seen = peer.regions_version;
  }
  peer.control->send(wire::MsgType::kRegionsReq, "");
  std::unique_lock<std::mutex> lock(peer.mu);
  bool ok = peer.cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                             [&] { return peer.regions_version != seen || peer.dead; });
  if (peer.dead) fail(ErrorCode::kTransport, "peer '" + peer.name + "' is gone: " + peer.death);
  if (!ok) fail(ErrorCode::kTimeout, "peer '" + peer.name + "' did not list its regions in time");
  std::map<uint32_t, uint64_t> out;
  for (const auto& [id, r] : peer.regions) out[id] = r.nbytes;
  return out;
}

std::shared_ptr<TransferState> Endpoint::write(PeerConn& peer, uint32_t local_region,
                                               uint32_t remote_region, const int64_t* segments,
                                               size_t n, const std::string* notify,
                                               const TransferOptions& opts) {
  return start(OpKind::kWrite, peer, local_region, remote_region, segments, n, notify, opts);
}

std::shared_ptr<TransferState> Endpoint::read(PeerConn& peer, uint32_t local_region,
                                              uint32_t remote_region, const int64_t* segments,
                                              size_t n, const std::string* notify,
                                              const TransferOptions& opts) {
  return start(OpKind::kRead, peer, local_region, remote_region, segments, n, notify, opts);
}

std::shared_ptr<TransferState> Endpoint::start(OpKind kind, PeerConn& peer, uint32_t local_region,
                                               uint32_t remote_region, const int64_t* segments,
                                               size_t n, const std::string* notify,
                                               const TransferOptions& opts) {
  const bool write = kind == OpKind::kWrite;
  const double timeout_s = opts.timeout_s > 0 ? opts.timeout_s : options_.timeout_s;
  const char* verb = write ? "write" : "read";
  if (closing_) fail(ErrorCode::kInvalidRequest, "endpoint '" + options_.name + "' is closed");
  if (!peer.outbound) {
    fail(ErrorCode::kInvalidRequest, "transfers start from the endpoint that connected; peer '" +
                                         peer.name + "' connected to us");
  }
  if (peer.dead) fail(ErrorCode::kTransport, "peer '" + peer.name + "' is gone: " + peer.death);
  if (notify && notify->size() > wire::kMaxNotify) {
    fail(ErrorCode::kInvalidRequest, "notification payload of " + std::to_string(notify->size()) +
                                         " bytes is over the limit of " + std::to_string(wire::kMaxNotify));
  }
  auto local = regions_.lookup(local_region);
  RemoteRegion remote = this->remote_region(peer, remote_region, timeout_s);
  if (write && !remote.remote_write) {
    fail(ErrorCode::kInvalidRequest, "peer '" + peer.name + "' region " + std::to_string(remote_region) +
                                         " does not accept remote writes");
  }
  if (!write && !remote.remote_read) {
    fail(ErrorCode::kInvalidRequest, "peer '" + peer.name + "' region " + std::to_string(remote_region) +
                                         " was not registered with remote_read=True");
  }
  const uint64_t local_size = local->nbytes, remote_size = remote.nbytes;
  OpRequest op;
  op.kind = kind;
  op.remote = remote;
  op.checksum = opts.checksum < 0 ? options_.checksum : opts.checksum != 0;
  op.segments.reserve(n);
  uint64_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    int64_t src = segments[3 * i], dst = segments[3 * i + 1], len = segments[3 * i + 2];
    if (src < 0 || dst < 0 || len < 0) {
      fail(ErrorCode::kInvalidRequest, std::string(verb) + " segment " + std::to_string(i) +
                                           " has a negative value (" + std::to_string(src) + ", " +
                                           std::to_string(dst) + ", " + std::to_string(len) + ")");
    }
    uint64_t s = static_cast<uint64_t>(src), d = static_cast<uint64_t>(dst), l = static_cast<uint64_t>(len);
    uint64_t src_size = write ? local_size : remote_size, dst_size = write ? remote_size : local_size;
    if (!in_bounds(s, l, src_size) || !in_bounds(d, l, dst_size)) {
      fail(ErrorCode::kInvalidRequest,
           std::string(verb) + " segment " + std::to_string(i) + " (" + std::to_string(s) + ", " +
               std::to_string(d) + ", " + std::to_string(l) + ") is out of bounds: source region has " +
               std::to_string(src_size) + " bytes, destination " + std::to_string(dst_size));
    }
    if (l == 0) continue;
    op.segments.push_back(Segment{s, d, l});
    bytes += l;
  }
  uint64_t slot = next_slot_++;
  op.slot = slot;
  op.bytes = bytes;
  op.local = local;
  auto x = std::make_shared<TransferState>(slot, peer.id, kind, bytes, timeout_s);
  x->has_notify = notify != nullptr;
  if (notify) x->notify = *notify;
  x->hold = local;
  auto prepared = peer.link->prepare(std::move(op));
  x->units_expected = prepared->units;
  {
    std::lock_guard<std::mutex> lock(mu_);
    transfers_[slot] = x;
  }
  add_pending();
  if (write) {
    wire::Begin begin{slot, prepared->units, static_cast<uint32_t>(timeout_s * 1000), x->has_notify,
                      x->notify,
                      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                x->start.time_since_epoch()).count())};
    // A one-unit write's BEGIN rides in its unit where the transport can carry it: the target
    // then learns of the transfer and receives it in one message, with one thread woken.
    if (carries_begin_ && prepared->units == 1) {
      prepared->begin = wire::encode(begin);
    } else {
      try {
        peer.control->send(wire::MsgType::kBegin, wire::encode(begin));
      } catch (const Error& e) {
        finish_transfer(slot, TransferStatus::kError, ErrorCode::kTransport, e.what());
        return x;
      }
    }
    peer.link->post(std::move(prepared));
  } else if (prepared->units == 0) {
    on_read_landed(slot, 0);
  } else {
    peer.link->post(std::move(prepared));
  }
  return x;
}

void Endpoint::finish_transfer(uint64_t slot, TransferStatus s, ErrorCode code,
                               const std::string& error) {
  std::shared_ptr<TransferState> x;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = transfers_.find(slot);
    if (it == transfers_.end()) return;
    x = it->second;
    transfers_.erase(it);
  }
  // Only the caller that removed it from the table gets here, so count before waking waiters:
  // whoever returns from wait() then sees the stats already include this transfer.
  if (s == TransferStatus::kDone) {
    stats_.transfers_done++;
    (x->kind == OpKind::kWrite ? stats_.bytes_written : stats_.bytes_read) += x->bytes;
    stats_.add_latency(std::chrono::duration<double>(Clock::now() - x->start).count());
  } else {
    stats_.transfers_failed++;
  }
  x->finish(s, code, error);
}

// ---------------------------------------------------------------- notifications

// A waiting thread's reading of inbound data (Transport::reader_begin ... reader_end), from its
// first poll, which the queue makes only when it has not found its notification already. What
// it settles owes the initiator an ACK: sent on its next turn while it still waits, or once it
// is done, by handoff_, so that a waiter that found its notification returns at once.
class Endpoint::WaitingReader : public WaitActivity {
 public:
  WaitingReader(Endpoint& ep, bool sleeps) : ep_(ep), sleeps_(sleeps) {}

  bool progress() override {
    if (!started_) {
      started_ = true;
      reading_ = ep_.transport_->reader_begin(sleeps_);
      // A spinner's end is handed off without a wake-up (HandoffThread::watch); a sleeper's,
      // which may sleep for seconds, with one.
      if (reading_ && !sleeps_) ep_.handoff_.watch();
    }
    if (!reading_) return false;
    ep_.send_acks(acks_);
    struct Owed {
      explicit Owed(std::vector<OwedAck>* a) { owed_acks_ = a; }
      ~Owed() { owed_acks_ = nullptr; }
    } owed(&acks_);
    bool handled = ep_.transport_->poll_inbound(sleeps_);
    if (handled) (sleeps_ ? ep_.stats_.sleep_reads : ep_.stats_.spin_reads)++;
    return handled;
  }

  bool sleep(int wake_fd, int timeout_ms) override {
    stepped_aside_ = !reading_ || !ep_.transport_->sleep_inbound(wake_fd, timeout_ms);
    return !stepped_aside_;
  }

  void over() override {
    if (!reading_) return;
    reading_ = false;
    auto end = [&ep = ep_, sleeps = sleeps_, acks = std::move(acks_)]() mutable {
      ep.send_acks(acks);
      ep.transport_->reader_end(sleeps);
    };
    if (stepped_aside_) {
      // Bulk traffic: the parked connection threads must read it now, not whenever the
      // lowest-priority helper gets a busy core; and this thread is only going to sleep.
      end();
    } else if (sleeps_) {
      ep_.handoff_.post(std::move(end));
    } else {
      ep_.handoff_.post_quietly(std::move(end));
    }
  }

 private:
  Endpoint& ep_;
  const bool sleeps_;
  bool started_ = false, reading_ = false, stepped_aside_ = false;
  std::vector<OwedAck> acks_;
};

Notification Endpoint::wait_notification(const std::string& payload, double timeout_s,
                                         double spin_s) {
  WaitingReader reader(*this, spin_s <= 0);
  return notifications_.wait_for(payload, timeout_s, spin_s, &reader);
}

std::vector<Notification> Endpoint::notifications(double timeout_s) {
  if (timeout_s <= 0) return notifications_.drain();
  WaitingReader reader(*this, true);
  return notifications_.wait_any(timeout_s, &reader);
}

// ---------------------------------------------------------------- transport upcalls

void Endpoint::on_arrival(uint64_t peer, uint64_t slot, uint32_t units) {
  if (auto o = inbound_.arrive(peer, slot, units)) settle(std::move(*o));
  add_pending();
}

void Endpoint::refuse_inbound(const std::string& prefix, const std::string& reason) {
  for (auto& o : inbound_.refuse_prefix(prefix, reason)) settle(std::move(o));
}

bool Endpoint::accepts(uint64_t peer, uint64_t slot) { return inbound_.accepts(peer, slot); }

void Endpoint::on_refused(uint64_t peer, uint64_t slot, const Error& error) {
  if (auto o = inbound_.abort(peer, slot, error.code(), error.what())) settle(std::move(*o));
}

void Endpoint::on_read_landed(uint64_t slot, uint32_t units) {
  std::shared_ptr<TransferState> x;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = transfers_.find(slot);
    if (it == transfers_.end()) return;
    x = it->second;
  }
  if (x->units_landed.fetch_add(units) + units != x->units_expected) return;
  if (!x->has_notify) {
    finish_transfer(slot, TransferStatus::kDone, ErrorCode::kTransport, "");
    return;
  }
  // The read is complete here; its notification goes to the target, whose ACK ends it.
  auto peer = find_peer(x->peer);
  try {
    if (!peer) fail(ErrorCode::kTransport, "peer is gone");
    peer->control->send(wire::MsgType::kNotify, wire::encode_slot_bytes(slot, x->notify));
  } catch (const Error& e) {
    finish_transfer(slot, TransferStatus::kError, ErrorCode::kTransport,
                    std::string("read completed but its notification could not be sent: ") + e.what());
  }
}

void Endpoint::on_op_failed(uint64_t slot, const Error& error) {
  finish_transfer(slot, TransferStatus::kError, error.code(), error.what());
}

void Endpoint::on_link_failed(uint64_t peer, const Error& error) {
  if (peer == 0) {
    record_error(error);  // a connection that never identified itself
    return;
  }
  peer_failed(peer, error);
}

void Endpoint::peer_failed(uint64_t id, const Error& error) {
  auto peer = find_peer(id);
  if (!peer || peer->dead.exchange(true)) return;
  std::string why = error.what();
  {
    std::lock_guard<std::mutex> lock(peer->mu);
    peer->death = why;
  }
  peer->cv.notify_all();
  if (error.code() == ErrorCode::kProtocol || error.code() == ErrorCode::kAuthentication) {
    record_error(error);
  }
  peer->control->shutdown();
  if (!peer->outbound) transport_->end_session(id);
  std::vector<uint64_t> slots;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [slot, x] : transfers_) {
      if (x->peer == id) slots.push_back(slot);
    }
  }
  for (uint64_t slot : slots) {
    finish_transfer(slot, TransferStatus::kError, ErrorCode::kTransport,
                    "peer '" + peer->name + "' failed: " + why);
  }
  for (auto& o : inbound_.fail_peer(id, "initiator '" + peer->name + "' failed: " + why)) {
    settle(std::move(o));
  }
}

void Endpoint::record_error(const Error& e) {
  stats_.errors++;
  std::lock_guard<std::mutex> lock(errors_mu_);
  if (errors_.size() >= 1000) errors_.erase(errors_.begin());
  errors_.push_back(e);
}

std::vector<Error> Endpoint::errors() const {
  std::lock_guard<std::mutex> lock(errors_mu_);
  return errors_;
}

// Forgets dead peers so connect/close cycles do not accumulate them; runs on threads that
// start connections, never on a link's own threads (closing a link joins them).
void Endpoint::reap_dead_peers() {
  std::vector<std::shared_ptr<PeerConn>> dead;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = peers_.begin(); it != peers_.end();) {
      if (it->second->dead) {
        dead.push_back(it->second);
        it = peers_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& p : dead) {
    if (p->link) p->link->close();
  }
}

std::shared_ptr<PeerConn> Endpoint::find_peer(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = peers_.find(id);
  return it == peers_.end() ? nullptr : it->second;
}

// ---------------------------------------------------------------- deadlines

void Endpoint::add_pending() {
  if (watch_idle_.exchange(false)) {
    std::lock_guard<std::mutex> lock(watch_mu_);  // not lost between its check and its wait
    watch_cv_.notify_one();
  }
}

// Wakes every 10 ms to expire deadlines while work is pending and for a second after (a
// bounded tick instead of a heap: cheap, and deadlines are seconds); then sleeps until new work
// wakes it. So a steady stream of transfers never has to wake it.
void Endpoint::watchdog_loop() {
  constexpr auto kTick = std::chrono::milliseconds(10);
  constexpr auto kLinger = std::chrono::seconds(1);
  std::unique_lock<std::mutex> lock(watch_mu_);
  auto last_busy = Clock::now();
  while (!closing_) {
    watch_idle_ = true;  // before looking: work added after this wakes us, work before is seen
    bool busy;
    {
      std::lock_guard<std::mutex> l2(mu_);
      busy = !transfers_.empty();
    }
    busy = busy || inbound_.pending() > 0;
    if (busy) last_busy = Clock::now();
    if (busy || Clock::now() - last_busy < kLinger) {
      watch_idle_ = false;
      watch_cv_.wait_for(lock, kTick);
    } else {
      watch_cv_.wait_for(lock, std::chrono::seconds(1), [this] { return !watch_idle_ || closing_; });
    }
    if (closing_) break;
    lock.unlock();
    auto now = Clock::now();
    std::vector<std::shared_ptr<TransferState>> late;
    {
      std::lock_guard<std::mutex> l2(mu_);
      for (const auto& [slot, x] : transfers_) {
        if (x->deadline <= now) late.push_back(x);
      }
    }
    for (const auto& x : late) {
      finish_transfer(x->slot, TransferStatus::kError, ErrorCode::kTimeout,
                      "transfer deadline passed before the target acknowledged it");
      abort_remote(x->peer, x->slot, "deadline passed");
    }
    for (auto& o : inbound_.expire(now)) settle(std::move(o));
    lock.lock();
  }
}

// ---------------------------------------------------------------- shutdown

bool Endpoint::cancel(TransferState& x) {
  if (x.status() != TransferStatus::kPending) return false;
  finish_transfer(x.slot, TransferStatus::kError, ErrorCode::kTransport, "cancelled by the initiator");
  abort_remote(x.peer, x.slot, "cancelled by the initiator");
  return x.status() == TransferStatus::kError;
}

void Endpoint::abort_remote(uint64_t peer_id, uint64_t slot, const std::string& reason) {
  if (auto peer = find_peer(peer_id); peer && !peer->dead) {
    try {
      peer->control->send(wire::MsgType::kAbort, wire::encode_slot_bytes(slot, reason));
    } catch (const Error&) {
      // The control loop reports the broken connection.
    }
  }
}

void Endpoint::disconnect(PeerConn& peer) {
  peer_failed(peer.id, Error(ErrorCode::kTransport, "disconnected by this endpoint"));
  reap_dead_peers();
}

void Endpoint::close() {
  if (closing_.exchange(true)) return;
  handoff_.stop();
  watch_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  listener_.shutdown_both();
  std::map<uint64_t, std::shared_ptr<PeerConn>> peers;
  std::map<uint64_t, std::shared_ptr<TransferState>> transfers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers.swap(peers_);
    transfers.swap(transfers_);
  }
  for (auto& [_, p] : peers) {
    p->dead = true;
    p->control->shutdown();
    p->cv.notify_all();
  }
  for (auto& [_, x] : transfers) {
    x->finish(TransferStatus::kError, ErrorCode::kTransport, "endpoint '" + options_.name + "' closed");
  }
  for (auto& [_, p] : peers) {
    if (p->link) p->link->close();
  }
  transport_->shutdown();
  threads_.join_all();
}

}  // namespace kvt
