#include "transport/cma/cma_link.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "transport/cma/cma_channel.h"

namespace kvt::cma {

struct CmaOp : public PreparedOp {
  struct Unit {
    uint32_t l0, l1;  // local_iov[l0, l1)
    uint32_t r0, r1;  // remote[r0, r1)
    uint64_t extent;  // the unit touches the remote region below this offset
  };
  OpKind kind = OpKind::kWrite;
  uint64_t slot = 0;
  std::shared_ptr<const Region> local;  // keeps local memory registered until the op ends
  RemoteRegion region;
  std::vector<struct iovec> local_iov;
  std::vector<struct iovec> remote;  // iov_base holds an offset into the remote region
  std::vector<Unit> parts;
  uint32_t next = 0;  // next unit to hand out (under the link's mutex)
  std::atomic<uint32_t> finished{0};
  std::atomic<bool> failed{false};  // reported, or abandoned by a stopped link
};

namespace {

char* end_of(const struct iovec& v) { return static_cast<char*>(v.iov_base) + v.iov_len; }

}  // namespace

CmaLink::CmaLink(TransportSink& sink, uint64_t peer, net::Socket sock, pid_t pid,
                 std::unique_ptr<RegionTableView> table, int workers)
    : sink_(sink), peer_(peer), sock_(std::move(sock)), pid_(pid), table_(std::move(table)) {
  if (char* area = table_->ring_area()) ring_ = std::make_unique<ArrivalRing>(area);
  for (int i = 0; i < std::max(1, workers); ++i) {
    threads_.spawn("kvt-cma-copy", [this] { worker_loop(); });
  }
  threads_.spawn("kvt-cma-watch", [this] { watch_loop(); });
}

CmaLink::~CmaLink() { close(); }

std::unique_ptr<PreparedOp> CmaLink::prepare(OpRequest op) {
  auto p = std::make_unique<CmaOp>();
  const bool write = op.kind == OpKind::kWrite;
  p->kind = op.kind;
  p->slot = op.slot;
  p->region = op.remote;
  char* base = op.local->base;
  auto& local = p->local_iov;
  auto& remote = p->remote;
  local.reserve(op.segments.size());
  remote.reserve(op.segments.size());
  CmaOp::Unit cur{0, 0, 0, 0, 0};
  uint64_t cur_bytes = 0;
  auto close_unit = [&] {
    if (cur_bytes > 0) {
      cur.l1 = static_cast<uint32_t>(local.size());
      cur.r1 = static_cast<uint32_t>(remote.size());
      p->parts.push_back(cur);
    }
    cur = CmaOp::Unit{static_cast<uint32_t>(local.size()), 0, static_cast<uint32_t>(remote.size()), 0, 0};
    cur_bytes = 0;
  };
  for (const Segment& s : op.segments) {
    char* lp = base + (write ? s.src_off : s.dst_off);
    uint64_t ro = write ? s.dst_off : s.src_off;
    uint64_t done = 0;
    while (done < s.len) {
      if (cur_bytes == kMaxUnitBytes || local.size() - cur.l0 == kMaxUnitIovecs ||
          remote.size() - cur.r0 == kMaxUnitIovecs) {
        close_unit();
      }
      uint64_t piece = std::min(s.len - done, kMaxUnitBytes - cur_bytes);
      // Local and remote iovec lists need not pair up, so each side merges its own runs
      // (a random block table still has a contiguous source).
      if (local.size() > cur.l0 && end_of(local.back()) == lp + done) {
        local.back().iov_len += piece;
      } else {
        local.push_back(iovec{lp + done, piece});
      }
      char* roff = reinterpret_cast<char*>(ro + done);
      if (remote.size() > cur.r0 && end_of(remote.back()) == roff) {
        remote.back().iov_len += piece;
      } else {
        remote.push_back(iovec{roff, piece});
      }
      cur.extent = std::max(cur.extent, ro + done + piece);
      cur_bytes += piece;
      done += piece;
    }
  }
  close_unit();
  p->local = std::move(op.local);
  p->units = static_cast<uint32_t>(p->parts.size());
  return p;
}

void CmaLink::post(std::unique_ptr<PreparedOp> op) {
  std::shared_ptr<CmaOp> p(static_cast<CmaOp*>(op.release()));
  if (p->parts.empty()) return;
  bool inline_copy = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopped_) {
      inline_copy = p->parts.size() == 1 && queue_.empty();
      if (inline_copy) {
        p->next = 1;
      } else {
        queue_.push_back(p);
      }
    }
  }
  if (failed_.load() || closed_.load()) {
    sink_.on_op_failed(p->slot, Error(ErrorCode::kTransport, "cma session with the target is closed"));
    return;
  }
  if (inline_copy) {
    run_unit(*p, 0);
  } else if (p->parts.size() > 1) {
    cv_.notify_all();
  } else {
    cv_.notify_one();
  }
}

void CmaLink::worker_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return stopped_ || !queue_.empty(); });
    if (stopped_) return;  // what is queued fails with the link (the Endpoint is told)
    std::shared_ptr<CmaOp> op = queue_.front();
    uint32_t i = op->next++;
    if (op->next == op->parts.size()) queue_.pop_front();
    lock.unlock();
    run_unit(*op, i);
    lock.lock();
  }
}

void CmaLink::run_unit(CmaOp& op, uint32_t i) {
  bool copy;
  {
    std::lock_guard<std::mutex> lock(mu_);
    copy = !stopped_ && !op.failed.load();
    if (copy) ++copying_;
  }
  if (copy) {
    try {
      copy_unit(op, i);
    } catch (const Error& e) {
      fail_op(op, e);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      --copying_;
    }
    idle_cv_.notify_all();
  } else {
    op.failed.store(true);  // abandoned: the link stopped, the Endpoint fails its transfers
  }
  if (op.finished.fetch_add(1) + 1 != op.parts.size() || op.failed.load()) return;
  if (op.kind == OpKind::kRead) {
    sink_.on_read_landed(op.slot, op.units);
    return;
  }
  try {
    // Every unit's copy returned, so all of the op's bytes are in the target's memory.
    if (!tell_in_ring(op)) send_msg(sock_, MsgType::kArrived, op.units, op.slot, op.begin);
  } catch (const Error& e) {
    broken(e);
  }
}

// While a waiter of the target polls the arrival ring, the record goes there, with no system
// call on either side; a doorbell follows if that waiter stopped meanwhile. False: send it on
// the socket (no waiter, a full ring, a BEGIN too long for it).
bool CmaLink::tell_in_ring(const CmaOp& op) {
  if (!ring_ || !ring_->polled()) return false;
  {
    std::lock_guard<std::mutex> lock(ring_mu_);
    if (!ring_->push(op.slot, op.units, op.begin)) return false;
  }
  if (!ring_->polled()) send_msg(sock_, MsgType::kDoorbell, 0, 0);
  return true;
}

void CmaLink::copy_unit(CmaOp& op, uint32_t i) {
  const CmaOp::Unit& u = op.parts[i];
  const bool write = op.kind == OpKind::kWrite;
  struct iovec liov[kMaxUnitIovecs], riov[kMaxUnitIovecs];
  const size_t ln = u.l1 - u.l0, rn = u.r1 - u.r0;
  std::copy(op.local_iov.begin() + u.l0, op.local_iov.begin() + u.l1, liov);
  Grant g = table_->acquire(op.region, write, u.extent);
  uint64_t total = 0;
  for (size_t k = 0; k < rn; ++k) {
    const struct iovec& r = op.remote[u.r0 + k];
    riov[k] = iovec{reinterpret_cast<char*>(g.addr + reinterpret_cast<uint64_t>(r.iov_base)), r.iov_len};
    total += r.iov_len;
  }
  size_t lf = 0, rf = 0;
  uint64_t done = 0;
  int err = 0;
  while (done < total) {
    ssize_t n = write ? ::process_vm_writev(pid_, liov + lf, ln - lf, riov + rf, rn - rf, 0)
                      : ::process_vm_readv(pid_, liov + lf, ln - lf, riov + rf, rn - rf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EFAULT;
      break;
    }
    // A short count: the kernel stopped at an iovec it could not access; the retry says why.
    done += static_cast<uint64_t>(n);
    lf = net::advance(liov, ln, lf, static_cast<size_t>(n));
    rf = net::advance(riov, rn, rf, static_cast<size_t>(n));
  }
  table_->release(g);
  if (err == 0) return;
  const std::string what = std::string(write ? "process_vm_writev into" : "process_vm_readv from") +
                           " target process " + std::to_string(pid_) + " (region " +
                           std::to_string(op.region.id) + ")";
  if (err == ESRCH) {
    Error e(ErrorCode::kTransport, "cma: " + what + ": the target process exited");
    broken(e);
    throw e;
  }
  if (err == EPERM) {
    fail(ErrorCode::kTransport, "cma: " + what + " is not permitted any more (it changed its "
                                "credentials or dumpable state?)");
  }
  if (err == EFAULT) {
    fail(ErrorCode::kTransport, "cma: " + what + ": the registered memory is not mapped in the "
                                "target (freed before it was deregistered?)");
  }
  fail(ErrorCode::kTransport, "cma: " + what + " failed: " + std::strerror(err));
}

void CmaLink::fail_op(CmaOp& op, const Error& e) {
  if (op.failed.exchange(true)) return;
  sink_.on_op_failed(op.slot, e);
  if (op.kind != OpKind::kWrite || failed_.load()) return;
  // The target must fail the transfer too rather than wait for its deadline; a BEGIN this op
  // carried has not reached it yet.
  try {
    if (!op.begin.empty()) send_msg(sock_, MsgType::kBegin, 0, op.slot, op.begin);
    send_msg(sock_, MsgType::kRefused, static_cast<uint32_t>(e.code()), op.slot, e.what());
  } catch (const Error& se) {
    broken(se);
  }
}

void CmaLink::watch_loop() {
  std::string why = "it exited or dropped this peer";
  try {
    Msg m;
    while (recv_msg(sock_, m)) {
      for (int fd : m.fds) ::close(fd);
      if (m.type != MsgType::kDenied) continue;
      why = "it refused: " + m.text;
      break;
    }
  } catch (const Error& e) {
    why = e.what();
  }
  if (!closed_.load()) {
    broken(Error(ErrorCode::kTransport,
                 "cma: target process " + std::to_string(pid_) + " closed the session: " + why));
  }
  // The target stops counting this session's accesses at our end of file, so it comes only
  // once none of ours is under way (a process that dies closes it after its last copy, too).
  quiesce();
  ::shutdown(sock_.fd(), SHUT_WR);
}

void CmaLink::quiesce() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    stopped_ = true;
    queue_.clear();
    idle_cv_.wait(lock, [&] { return copying_ == 0; });
  }
  cv_.notify_all();
}

void CmaLink::broken(const Error& e) {
  if (closed_.load() || failed_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
  sink_.on_link_failed(peer_, e);
}

void CmaLink::close() {
  if (closed_.exchange(true)) return;
  quiesce();
  sock_.shutdown_both();
  threads_.join_all();
}

}  // namespace kvt::cma
