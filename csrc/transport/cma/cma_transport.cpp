#include "transport/cma/cma_transport.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "auth/hmac_sha256.h"
#include "transport/cma/cma_address.h"
#include "transport/cma/cma_channel.h"
#include "transport/cma/cma_link.h"

namespace kvt::cma {
namespace {

constexpr double kHelloTimeoutS = 5.0;
constexpr uint64_t kHugePage = 2u << 20;

std::string hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

// process_vm_* pins the target's pages one by one: with transparent huge pages it walks 512x
// fewer of them (+40-70% here, docs/transports.md). Only whole 2 MiB pages inside the region
// are advised, so no memory outside it changes; KVTRANSFER_CMA_HUGEPAGES=0 turns it off.
void advise_huge_pages(const Region& r) {
  static const bool enabled = [] {
    const char* v = std::getenv("KVTRANSFER_CMA_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!enabled || r.nbytes < 2 * kHugePage) return;
  uint64_t lo = (reinterpret_cast<uint64_t>(r.base) + kHugePage - 1) & ~(kHugePage - 1);
  uint64_t hi = (reinterpret_cast<uint64_t>(r.base) + r.nbytes) & ~(kHugePage - 1);
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
}

// Proves at connect time that this process may attach to `pid` and that `pid` is the target:
// read a word the target published the address and value of.
void probe(pid_t pid, const TableHeader& h, const CmaAddress& a) {
  uint64_t got = 0;
  struct iovec local{&got, sizeof got};
  struct iovec remote{reinterpret_cast<void*>(h.probe_addr), sizeof got};
  ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
  const std::string who = "target process " + std::to_string(pid) +
                          (pid != a.pid ? " (pid " + std::to_string(a.pid) + " in its own namespace)" : "");
  if (n < 0 && (errno == EPERM || errno == EACCES)) {
    fail(ErrorCode::kTransport,
         "cma: this process may not access the memory of " + who + " (process_vm_readv: " +
             std::strerror(errno) + "). Cross-memory attach needs ptrace access to the target: "
             "the same user, and /proc/sys/kernel/yama/ptrace_scope 0 or CAP_SYS_PTRACE; in a "
             "container, --cap-add SYS_PTRACE or a seccomp profile that allows "
             "process_vm_readv/process_vm_writev. Otherwise use transport='tcp'");
  }
  if (n < 0 && errno == ENOSYS) {
    fail(ErrorCode::kTransport, "cma: this kernel has no process_vm_readv (built without "
                                "CONFIG_CROSS_MEMORY_ATTACH); use transport='tcp'");
  }
  if (n < 0) {
    fail(ErrorCode::kTransport, "cma: cannot attach to " + who + ": process_vm_readv failed: " +
                                    std::strerror(errno) + "; use transport='tcp'");
  }
  if (n != static_cast<ssize_t>(sizeof got) || got != h.probe_value) {
    fail(ErrorCode::kTransport, "cma: pid " + std::to_string(pid) + " as seen here is not the "
                                "target process (pid namespaces differ?); use transport='tcp'");
  }
}

std::string seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

}  // namespace

CmaTransport::CmaTransport(TransportContext ctx) : ctx_(std::move(ctx)) {
  CmaAddress a;
  a.boot_id = this_boot_id();
  a.pid = static_cast<int>(::getpid());
  a.socket = "kvtransfer-cma-" + std::to_string(a.pid) + "-" + hex(auth::random_bytes(8));
  listener_ = listen_abstract(a.socket);
  address_ = encode_address(a);
  threads_.spawn("kvt-cma-accept", [this] { accept_loop(); });
}

CmaTransport::~CmaTransport() { shutdown(); }

TransportCaps CmaTransport::caps() const {
  TransportCaps c;
  c.name = "cma";
  c.rdma_read = true;
  c.ordered = false;  // units are copied by several threads
  c.software_key_check = true;
  c.carries_begin = true;  // in the kArrived record: one message per small write
  return c;
}

std::string CmaTransport::register_region(const Region& region) {
  advise_huge_pages(region);
  if (!region.remote_write && !region.remote_read) return {};
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_.load()) fail(ErrorCode::kInvalidRequest, "cma: the transport is shut down");
  uint32_t slot = table_.publish(region);
  slots_[region.id] = slot;
  return encode_slot(slot);
}

void CmaTransport::deregister_region(const Region& region) {
  uint32_t slot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(region.id);
    if (it == slots_.end()) return;
    slot = it->second;
    slots_.erase(it);
    table_.withdraw(slot);
  }
  const double timeout_s = ctx_.options.connect_timeout_s;
  std::string holder;
  if (!drain(slot, timeout_s, holder)) {
    // The slot stays withdrawn and is never reused: that initiator may still finish its copy.
    fail(ErrorCode::kTimeout,
         "cma: region " + std::to_string(region.id) + " is still being accessed by " + holder +
             " after " + seconds(timeout_s) + " s (is that process frozen?); it accepts "
             "no new access, but keep its memory mapped until that peer exits");
  }
  std::lock_guard<std::mutex> lock(mu_);
  table_.recycle(slot);
}

bool CmaTransport::drain(uint32_t slot, double timeout_s, std::string& holder) {
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [_, s] : sessions_) {
      if (s->board) sessions.push_back(s);
    }
  }
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                      std::chrono::duration<double>(timeout_s));
  for (const auto& s : sessions) {
    if (!s->board->wait_idle(slot, deadline, s->gone)) {
      holder = "peer session " + std::to_string(s->peer) + " (" +
               std::to_string(s->board->in_flight(slot)) + " copies in flight)";
      return false;
    }
  }
  return true;
}

void CmaTransport::accept_session(uint64_t peer, uint64_t token) {
  std::lock_guard<std::mutex> lock(mu_);
  tokens_[token] = peer;
}

void CmaTransport::end_session(uint64_t peer) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = tokens_.begin(); it != tokens_.end();) {
    it = it->second == peer ? tokens_.erase(it) : std::next(it);
  }
  // Half close: the initiator stops, lets its copies under way finish, and only then closes
  // its end, which is when we stop counting its accesses.
  for (auto& [_, s] : sessions_) {
    if (s->peer == peer) ::shutdown(s->sock.fd(), SHUT_WR);
  }
}

std::unique_ptr<DataLink> CmaTransport::connect(uint64_t peer, const std::string& remote_address,
                                                uint64_t token) {
  CmaAddress a = parse_address(remote_address);
  const std::string ours = this_boot_id();
  if (a.boot_id != ours) {
    fail(ErrorCode::kTransport,
         "cma: the peer runs on another host (its boot_id " + a.boot_id + ", ours " + ours +
             "); cma moves bytes only between processes on one host: use transport='tcp' or "
             "'fabric' between hosts");
  }
  const double timeout_s = ctx_.options.connect_timeout_s;
  net::Socket s = connect_abstract(a.socket, timeout_s);
  pid_t pid = peer_pid(s);
  if (pid <= 0) {
    fail(ErrorCode::kTransport,
         "cma: the target process (pid " + std::to_string(a.pid) + " in its own namespace) is "
         "not visible from this process's pid namespace (it runs in another container); cma "
         "needs to see the target's pid: share the pid namespace, or use transport='tcp'");
  }
  send_msg(s, MsgType::kHello, 0, token);
  Msg m;
  if (!recv_msg(s, m)) fail(ErrorCode::kTransport, "cma: the target closed the session while setting it up");
  if (m.type != MsgType::kWelcome || m.fds.size() != 2) {
    for (int fd : m.fds) ::close(fd);
    if (m.type == MsgType::kDenied) fail(ErrorCode::kProtocol, "cma: the target refused the session: " + m.text);
    fail(ErrorCode::kProtocol, "cma: the target answered the session hello with record type " +
                                   std::to_string(static_cast<uint32_t>(m.type)));
  }
  auto view = std::make_unique<RegionTableView>(m.fds[0], m.fds[1]);
  probe(pid, view->header(), a);
  set_recv_timeout(s, 0);
  return std::make_unique<CmaLink>(ctx_.sink, peer, std::move(s), pid, std::move(view),
                                   ctx_.options.connections);
}

void CmaTransport::accept_loop() {
  while (!stopping_.load()) {
    int fd = ::accept4(listener_.fd(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // listener shut down
    }
    auto s = std::make_shared<Session>(fd);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_.load()) return;
      sessions_[s.get()] = s;
    }
    threads_.spawn("kvt-cma-in", [this, s] { serve(s); });
  }
}

void CmaTransport::serve(std::shared_ptr<Session> s) {
  try {
    // A connection that does not present a live session token in time is dropped.
    set_recv_timeout(s->sock, kHelloTimeoutS);
    Msg m;
    if (!recv_msg(s->sock, m)) fail(ErrorCode::kProtocol, "cma session closed before its hello");
    for (int fd : m.fds) ::close(fd);
    if (m.type != MsgType::kHello) fail(ErrorCode::kProtocol, "cma session did not open with a hello");
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = tokens_.find(m.slot);
      if (it == tokens_.end()) {
        try {
          send_msg(s->sock, MsgType::kDenied, 0, 0, "unknown session token");
        } catch (const Error&) {
        }
        fail(ErrorCode::kProtocol, "cma session presented an unknown session token");
      }
      s->peer = it->second;
      s->board = std::make_unique<BusyBoard>();
      s->ring = std::make_unique<ArrivalRing>(s->board->ring_area());
    }
    send_msg(s->sock, MsgType::kWelcome, 0, 0, "", {table_.fd(), s->board->fd()});
    set_recv_timeout(s->sock, 0);
    s->serving.store(true);
    handover_.joined(s->io);
    serve_records(*s);
  } catch (const Error& e) {
    if (!stopping_.load()) ctx_.sink.on_link_failed(s->peer, e);
    // Its accesses keep counting until it lets go of the session.
    ::shutdown(s->sock.fd(), SHUT_WR);
    Msg m;
    try {
      while (recv_msg(s->sock, m)) {
        for (int fd : m.fds) ::close(fd);
      }
    } catch (const Error&) {
    }
  }
  handover_.left(s->io);
  s->gone.store(true);
  std::lock_guard<std::mutex> lock(mu_);
  sessions_.erase(s.get());
}

// The session's own thread: sleeps until a record comes (WaiterReaders::wait), then reads while
// any are queued. A reading waiter may have taken them first (poll_inbound).
void CmaTransport::serve_records(Session& s) {
  Msg m;
  while (!stopping_.load()) {
    {
      std::lock_guard<std::mutex> lock(s.io.mu);
      if (s.failure) throw *s.failure;  // met by a reading waiter; reported from here
      // Left in the ring as a waiter stopped polling, or rung for.
      if (take_arrivals(s)) handover_.took(s.io);
      Received got = recv_msg_now(s.sock, m);
      // End of file: the initiator closed the session (its control connection reports why).
      if (got == Received::kEnd) return;
      if (got == Received::kRecord) {
        handover_.took(s.io);
        handle_record(s, m);
        continue;
      }
      s.io.handoff.store(false);  // drained: a reading waiter may read it again
    }
    handover_.wait(s.io, stopping_);
  }
}

void CmaTransport::handle_record(Session& s, Msg& m) {
  for (int fd : m.fds) ::close(fd);
  if (m.type == MsgType::kArrived) {
    arrived(s, m.slot, m.arg, m.text);
  } else if (m.type == MsgType::kDoorbell) {
    take_arrivals(s);
  } else if (m.type == MsgType::kBegin) {
    ctx_.sink.on_begin(s.peer, m.text);
  } else if (m.type == MsgType::kRefused) {
    auto code = static_cast<ErrorCode>(m.arg);
    if (code < ErrorCode::kInvalidRequest || code > ErrorCode::kProtocol) code = ErrorCode::kProtocol;
    ctx_.sink.on_refused(s.peer, m.slot, Error(code, "the initiator's access was refused: " + m.text));
    if (code == ErrorCode::kProtocol) {
      // A wrong key or bounds: nothing landed, but as on TCP it ends that peer's session.
      fail(ErrorCode::kProtocol, "cma: transfer " + std::to_string(m.slot) + " of peer session " +
                                     std::to_string(s.peer) + " was refused: " + m.text);
    }
  } else {
    fail(ErrorCode::kProtocol, "cma: unexpected record type " +
                                   std::to_string(static_cast<uint32_t>(m.type)) + " from an initiator");
  }
}

// "Units of transfer `slot` landed", from the socket or the ring; a carried BEGIN goes first.
void CmaTransport::arrived(Session& s, uint64_t slot, uint32_t units, const std::string& begin) {
  if (!begin.empty()) ctx_.sink.on_begin(s.peer, begin);
  ctx_.sink.on_arrival(s.peer, slot, units);
}

bool CmaTransport::take_arrivals(Session& s) {
  bool took = false;
  Arrival a;
  while (s.ring && s.ring->pop(a)) {
    arrived(s, a.slot, a.units, a.text);
    took = true;
  }
  return took;
}

// Under mu_, as the count of spinning readers changes: the flags say whether any waiter spins
// (a spin's end runs late, on the hand-off thread, often after the next spin began). A
// sleeping reader raises none: it must be woken by the socket.
void CmaTransport::set_polled(bool on) {
  for (auto& [_, s] : sessions_) {
    if (s->ring) s->ring->set_polled(on);
  }
}

bool CmaTransport::reader_begin(bool sleeps) {
  handover_.begin(sleeps);
  std::lock_guard<std::mutex> lock(mu_);
  if (!sleeps && spinners_++ == 0) set_polled(true);
  return true;
}

// The last spinner lowers the flags, then takes what initiators put in the rings while the
// flags were up: nobody polls for those any more, and no doorbell announced them.
void CmaTransport::reader_end(bool sleeps) {
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!sleeps && --spinners_ == 0) {
      set_polled(false);
      for (auto& [_, s] : sessions_) {
        if (s->serving.load(std::memory_order_acquire)) sessions.push_back(s);
      }
    }
  }
  for (auto& s : sessions) {
    std::lock_guard<std::mutex> lock(s->io.mu);
    if (s->failure) continue;
    try {
      take_arrivals(*s);
    } catch (const Error& e) {
      s->failure = e;
      handover_.hand_back(s->io);
    }
  }
  handover_.end(sleeps);
}

// A session handed back is failing or ending: its thread reads it, and the waiter sleeps on its
// notification queue.
bool CmaTransport::sleep_inbound(int wake_fd, int timeout_ms) {
  return handover_.sleep_on(mu_, stopping_, sessions_, wake_fd, timeout_ms);
}

// A reading waiter takes what the arrival rings hold, then every record queued on the sockets
// (whole messages: SEQPACKET); an error or the end of the session goes back to the session's
// thread, which ends it as usual. Arrivals from a ring (a small write lands there, its BEGIN
// with it) return at once: the waiter looks for its notification before a system call reads
// the socket. Every other poll of a session reads it regardless, so that arrivals streaming in
// cannot starve its records, and polls start round robin, so that no session starves another.
bool CmaTransport::poll_inbound(bool /*sleeps*/) {
  std::vector<std::shared_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_.load()) return false;
    for (auto& [_, s] : sessions_) {
      if (s->serving.load(std::memory_order_acquire)) sessions.push_back(s);
    }
  }
  bool handled = false;
  Msg m;
  WaiterReaders::Readable readable;
  handover_.readable(readable, sessions.size());
  const size_t start = sessions.empty() ? 0 : poll_start_.load(std::memory_order_relaxed) % sessions.size();
  for (size_t k = 0; k < sessions.size(); ++k) {
    auto& s = sessions[(start + k) % sessions.size()];
    std::unique_lock<std::mutex> lock(s->io.mu, std::try_to_lock);
    if (!lock.owns_lock() || s->failure || s->io.handoff.load()) continue;
    try {
      if (take_arrivals(*s)) {
        handled = true;
        handover_.took(s->io);
        if (!s->socket_skipped) {
          s->socket_skipped = true;
          poll_start_.store(start + k + 1, std::memory_order_relaxed);
          return true;
        }
      }
      s->socket_skipped = false;
      if (!readable.has(s->io)) continue;  // its arrivals ring was read; its socket holds nothing
      Received got;
      while ((got = recv_msg_now(s->sock, m)) == Received::kRecord) {
        handover_.took(s->io);
        handle_record(*s, m);
        handled = true;
      }
      if (got == Received::kEnd) handover_.hand_back(s->io);
    } catch (const Error& e) {
      s->failure = e;
      handover_.hand_back(s->io);
    }
  }
  return handled;
}

void CmaTransport::shutdown() {
  if (stopping_.exchange(true)) return;
  // Once closed, nothing may land in this process's memory: withdraw every region and wait
  // (bounded) for copies under way.
  std::vector<uint32_t> slots;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [_, slot] : slots_) {
      table_.withdraw(slot);
      slots.push_back(slot);
    }
    slots_.clear();
  }
  std::string holder;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t slot : slots) {
    double spent = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    drain(slot, std::max(0.0, ctx_.options.connect_timeout_s - spent), holder);  // one bound for all
  }
  listener_.shutdown_both();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [_, s] : sessions_) s->sock.shutdown_both();
  }
  handover_.stop();
  threads_.join_all();
}

}  // namespace kvt::cma
