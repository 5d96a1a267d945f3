#include "transport/fabric/fabric_rail.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include <unistd.h>

#include "core/error.h"
#include "core/thread_name.h"
#include "transport/fabric/fabric_mr.h"
#include "transport/fabric/fabric_wire.h"

namespace kvt::fabric {
namespace {

// shm names its shared segment after the process id. A segment left behind by a killed process
// whose pid this process now has looks "in use by a live process" (this one), and fi_enable
// fails with EBUSY. A random suffix gives every endpoint its own segment name; the name still
// starts "fi_shm://<pid>:" as peers expect.
void unique_shm_name(struct fid_ep* ep) {
  std::vector<char> name(256, 0);
  size_t len = name.size();
  if (fi_getname(&ep->fid, name.data(), &len) != 0) return;  // keep the provider's name
  std::random_device rd;
  char suffix[24];
  std::snprintf(suffix, sizeof suffix, "-%08x%08x", rd(), rd());
  std::string unique = std::string(name.data()) + suffix;
  int rc = fi_setname(&ep->fid, unique.data(), unique.size() + 1);
  if (rc != 0) {
    fail(ErrorCode::kTransport, std::string("fi_setname failed on shm: ") + fi_strerror(-rc));
  }
}

constexpr size_t kSendSlots = 128;
// Every MAP must find a posted receive: ofi_rxd parks unexpected messages in its own packet
// pool, and a backlog of them (a target slow to repost, e.g. starved of CPU) stalls the peer
// for good (measured: 2 in 10 runs of 3000 transfers lost some at 128 receives, none at 512
// or 1024). So: as many as the provider's receive queue holds, up to 1024 (512 KiB).
constexpr size_t kRecvSlots = 1024;
constexpr size_t kCqBatch = 32;

std::string mr_mode_names(uint64_t m) {
  std::string s;
  auto add = [&](uint64_t bit, const char* name) {
    if (m & bit) s += (s.empty() ? "" : "|") + std::string(name);
  };
  add(FI_MR_LOCAL, "LOCAL");
  add(FI_MR_VIRT_ADDR, "VIRT_ADDR");
  add(FI_MR_ALLOCATED, "ALLOCATED");
  add(FI_MR_PROV_KEY, "PROV_KEY");
  add(FI_MR_ENDPOINT, "ENDPOINT");
  add(FI_MR_HMEM, "HMEM");
  add(FI_MR_RAW, "RAW");
  return s.empty() ? "none" : s;
}

fi_addr_t dest_of(const OpCtx* op) {
  if (op->kind == CtxKind::kSend) return static_cast<const SendCtx*>(op)->dest;
  if (op->kind == CtxKind::kRecv) return FI_ADDR_UNSPEC;
  return static_cast<const Unit*>(op)->dest;
}

}  // namespace

Rail::Rail(uint32_t index, InfoPtr info, RailEvents& events, bool delivery_complete)
    : index_(index), info_(std::move(info)), events_(events) {
  limits_.delivery_complete = delivery_complete;
  const fi_info* i = info_.get();
  limits_.tx_depth = std::max<size_t>(1, i->tx_attr->size);
  limits_.iov_limit = std::max<size_t>(1, i->tx_attr->iov_limit);
  limits_.rma_iov_limit = std::max<size_t>(1, i->tx_attr->rma_iov_limit);
  limits_.max_msg_size = i->ep_attr->max_msg_size ? i->ep_attr->max_msg_size : (1ull << 30);
  limits_.mr_mode = static_cast<uint64_t>(i->domain_attr->mr_mode);
  limits_.mr_key_size = i->domain_attr->mr_key_size ? i->domain_attr->mr_key_size : 8;
  limits_.mode = i->mode;
  limits_.manual_progress = i->domain_attr->data_progress == FI_PROGRESS_MANUAL;
  limits_.hmem = (i->caps & FI_HMEM) != 0;
  domain_name_ = i->domain_attr->name ? i->domain_attr->name : "?";
  try {
    open();
  } catch (...) {
    stop();
    close();
    throw;
  }
}

Rail::~Rail() {
  stop();
  close();
}

std::string Rail::describe() const {
  return std::string(info_->fabric_attr->prov_name) + " on " + domain_name_ + " (tx depth " +
         std::to_string(limits_.tx_depth) + ", iov " + std::to_string(limits_.iov_limit) + "/" +
         std::to_string(limits_.rma_iov_limit) + ", mr_mode " + mr_mode_names(limits_.mr_mode) +
         (limits_.manual_progress ? ", manual progress" : "") +
         (limits_.delivery_complete ? ", delivery-complete writes" : "") + ")";
}

void Rail::open() {
  auto check = [&](int rc, const char* what) {
    if (rc != 0) {
      fail(ErrorCode::kTransport, std::string(what) + " failed on " + describe() + ": " +
                                      fi_strerror(rc < 0 ? -rc : rc));
    }
  };
  check(fi_fabric(info_->fabric_attr, &obj_->fabric, nullptr), "fi_fabric");
  check(fi_domain(obj_->fabric, info_.get(), &obj_->domain, nullptr), "fi_domain");

  struct fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_DATA;
  cq_attr.size = std::max<size_t>(4096, limits_.tx_depth + info_->rx_attr->size);
  cq_attr.wait_cond = FI_CQ_COND_NONE;
  // shm has nothing that wakes a waiter when a peer writes into the shared segment: its
  // FI_WAIT_UNSPEC is a sched_yield() spin (a whole core per rail while idle). Poll it with
  // back-off instead, as EFA itself does for its shm path.
  const bool can_block = std::strcmp(info_->fabric_attr->prov_name, "shm") != 0;
  cq_attr.wait_obj = can_block ? FI_WAIT_UNSPEC : FI_WAIT_NONE;
  cq_waits_ = can_block;
  post_inline_ = can_block;  // shm: only the completion thread calls into the provider
  int rc = fi_cq_open(obj_->domain, &cq_attr, &obj_->cq, nullptr);
  if (rc != 0 && can_block) {  // no wait objects (EFA before 2.4): poll with back-off instead
    cq_attr.wait_obj = FI_WAIT_NONE;
    cq_waits_ = false;
    rc = fi_cq_open(obj_->domain, &cq_attr, &obj_->cq, nullptr);
  }
  check(rc, "fi_cq_open");

  struct fi_av_attr av_attr{};
  av_attr.type = info_->domain_attr->av_type == FI_AV_MAP ? FI_AV_MAP : FI_AV_TABLE;
  av_attr.count = 64;
  check(fi_av_open(obj_->domain, &av_attr, &obj_->av, nullptr), "fi_av_open");
  check(fi_endpoint(obj_->domain, info_.get(), &obj_->ep, nullptr), "fi_endpoint");
  check(fi_ep_bind(obj_->ep, &obj_->cq->fid, FI_TRANSMIT | FI_RECV), "binding the completion queue");
  check(fi_ep_bind(obj_->ep, &obj_->av->fid, 0), "binding the address vector");
  if (std::strcmp(info_->fabric_attr->prov_name, "shm") == 0) unique_shm_name(obj_->ep);
  check(fi_enable(obj_->ep), "fi_enable");

  size_t len = 0;
  std::vector<char> name(256);
  len = name.size();
  rc = fi_getname(&obj_->ep->fid, name.data(), &len);
  if (rc == -FI_ETOOSMALL) {
    name.resize(len);
    rc = fi_getname(&obj_->ep->fid, name.data(), &len);
  }
  check(rc, "fi_getname");
  address_.assign(name.data(), len);

  send_slots_ = std::min(kSendSlots, limits_.tx_depth);
  recv_slots_ = std::min<size_t>(kRecvSlots, std::max<size_t>(1, info_->rx_attr->size));
  obj_->arena.assign((send_slots_ + recv_slots_) * kMaxMsgBytes, 0);
  if (limits_.mr_mode & FI_MR_LOCAL) {
    std::random_device rd;
    uint64_t key = (static_cast<uint64_t>(rd()) << 32) | rd();
    obj_->arena_mr = register_memory(*this, obj_->arena.data(), obj_->arena.size(), FI_SEND | FI_RECV, key);
    arena_desc_ = fi_mr_desc(obj_->arena_mr);
  }
  credits_ = limits_.tx_depth;
  for (size_t s = 0; s < send_slots_; ++s) free_sends_.push_back(static_cast<int>(s));
  obj_->recvs.resize(recv_slots_);
  for (size_t r = 0; r < recv_slots_; ++r) {
    obj_->recvs[r].buf = static_cast<int>(send_slots_ + r);
    repost_.push_back(&obj_->recvs[r]);
  }
  post_receives();
  const std::string prov = info_->fabric_attr->prov_name;
  shares_local_memory_ = prov == "shm" || prov == "efa";
  if (shares_local_memory_) LocalPeers::instance().opened(address_);
  thread_ = std::thread([this] {
    name_this_thread("kvt-fab-cq");
    completion_loop();
  });
}

// One AV entry per distinct peer address, shared and counted: a peer that connects and closes
// 10,000 times reuses one entry instead of churning the AV (shm's holds only a few hundred).
fi_addr_t Rail::insert(const std::string& raw) {
  std::lock_guard<std::mutex> serial(av_mu_);
  if (stopping_) fail(ErrorCode::kTransport, "the " + describe() + " endpoint is closing");
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_raw_.find(raw);
    if (it != by_raw_.end()) {
      it->second.refs++;  // also revives an entry waiting to be forgotten
      return it->second.addr;
    }
  }
  // FI_ADDR_STR providers (shm) read a NUL-terminated string; others addrlen bytes.
  std::vector<char> buf(std::max<size_t>(raw.size() + 1, 256), 0);
  std::memcpy(buf.data(), raw.data(), raw.size());
  fi_addr_t addr = FI_ADDR_NOTAVAIL;
  int rc;
  {
    std::lock_guard<std::mutex> post(post_mu_);
    rc = fi_av_insert(obj_->av, buf.data(), 1, &addr, 0, nullptr);
  }
  if (rc != 1 || addr == FI_ADDR_NOTAVAIL) {
    fail(ErrorCode::kTransport, "the peer's address was refused by " + describe() + ": " +
                                    (rc < 0 ? fi_strerror(-rc) : "not inserted"));
  }
  if (shares_local_memory_) LocalPeers::instance().inserted(raw);
  std::lock_guard<std::mutex> lock(mu_);
  by_raw_[raw] = AvEntry{addr, 1};
  raw_of_[addr] = raw;
  // shm names an endpoint "fi_shm://<pid>:...": remember whose process it is.
  static const char kShm[] = "fi_shm://";
  if (std::strcmp(info_->fabric_attr->prov_name, "shm") == 0 &&
      raw.compare(0, sizeof kShm - 1, kShm) == 0) {
    int pid = std::atoi(raw.c_str() + sizeof kShm - 1);
    if (pid > 0) processes_[addr] = PeerProcess{pid, {}, true, raw};
  }
  return addr;
}

// shm 1.17 senders spin, forever, on a lock inside the peer's shared segment; a peer killed
// while holding it (its progress engine takes it for every command) wedges any thread that
// posts to it. Never post to a process that is gone (checked at most every 2 ms per peer).
bool Rail::peer_gone(fi_addr_t addr, std::string* why) {
  int pid = 0;
  std::string raw;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = processes_.find(addr);
    if (it == processes_.end()) return false;
    auto now = std::chrono::steady_clock::now();
    if (!it->second.alive) {
      pid = it->second.pid;
    } else if (now - it->second.checked < std::chrono::milliseconds(2)) {
      return false;
    } else {
      it->second.checked = now;
      pid = it->second.pid;
      raw = it->second.raw;
    }
  }
  if (pid == getpid() && LocalPeers::instance().parked(raw)) {
    *why = "the peer endpoint (in this process) is closed";
    return true;
  }
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
  bool alive = false;
  if (FILE* f = std::fopen(path, "r")) {
    char buf[512] = {0};
    size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    const char* paren = n ? std::strrchr(buf, ')') : nullptr;
    alive = paren && paren[1] == ' ' && paren[2] != 'Z' && paren[2] != 'X';
  }
  if (alive) return false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = processes_.find(addr);
    if (it != processes_.end()) it->second.alive = false;
  }
  *why = "the peer's process " + std::to_string(pid) + " is gone";
  return true;
}

void Rail::remove(fi_addr_t addr) {
  if (addr == FI_ADDR_UNSPEC || addr == FI_ADDR_NOTAVAIL) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto raw = raw_of_.find(addr);
  if (stopping_ || raw == raw_of_.end()) return;
  auto it = by_raw_.find(raw->second);
  if (it == by_raw_.end() || it->second.refs == 0) return;
  if (--it->second.refs == 0) {
    forget_.emplace_back(std::chrono::steady_clock::now() + kAvGrace, addr);
  }
}

void Rail::forget_due() {
  std::vector<std::pair<fi_addr_t, std::string>> due;
  std::lock_guard<std::mutex> serial(av_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    while (!forget_.empty() && forget_.front().first <= now) {
      fi_addr_t a = forget_.front().second;
      forget_.pop_front();
      auto raw = raw_of_.find(a);
      if (raw == raw_of_.end()) continue;
      auto it = by_raw_.find(raw->second);
      if (it != by_raw_.end() && it->second.refs > 0) continue;  // used again meanwhile
      if (it != by_raw_.end()) by_raw_.erase(it);
      due.emplace_back(a, raw->second);
      raw_of_.erase(raw);
      processes_.erase(a);
    }
  }
  for (auto& [a, raw] : due) {
    {
      std::lock_guard<std::mutex> post(post_mu_);
      fi_av_remove(obj_->av, &a, 1, 0);
    }
    // The last entry naming a parked same-process endpoint: nothing reaches it any more.
    if (shares_local_memory_) {
      if (auto parked = LocalPeers::instance().removed(raw)) parked->close();
    }
  }
}

ssize_t Rail::post(OpCtx* op, int send_slot) {
  switch (op->kind) {
    case CtxKind::kWrite:
    case CtxKind::kRead: {
      auto* u = static_cast<Unit*>(op);
      struct fi_msg_rma m{};
      m.msg_iov = u->iov.data();
      m.desc = u->desc.data();
      m.iov_count = u->iov.size();
      m.addr = u->dest;
      m.rma_iov = u->rma.data();
      m.rma_iov_count = u->rma.size();
      m.context = op;
      m.data = u->imm;
      const uint64_t dc = limits_.delivery_complete ? FI_DELIVERY_COMPLETE : 0;
      return op->kind == CtxKind::kWrite ? fi_writemsg(obj_->ep, &m, FI_REMOTE_CQ_DATA | dc)
                                         : fi_readmsg(obj_->ep, &m, 0);
    }
    case CtxKind::kSend: {
      auto* s = static_cast<SendCtx*>(op);
      char* buf = obj_->arena.data() + static_cast<size_t>(send_slot) * kMaxMsgBytes;
      std::memcpy(buf, s->bytes.data(), s->bytes.size());
      return fi_send(obj_->ep, buf, s->bytes.size(), arena_desc_, s->dest, op);
    }
    case CtxKind::kRecv:
      break;
  }
  return -FI_EINVAL;
}

bool Rail::pump() {
  std::vector<OpCtx*> skipped;
  std::vector<Failure> failed;
  bool pushed_back = false;
  while (!stopping_) {
    OpCtx* op = nullptr;
    int slot = -1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!queue_.empty() && queue_.front()->batch &&
             (queue_.front()->batch->failed.load() || queue_.front()->batch->cancelled.load())) {
        skipped.push_back(queue_.front());
        queue_.pop_front();
      }
      if (queue_.empty() || credits_ == 0) break;
      op = queue_.front();
      if (op->kind == CtxKind::kSend) {
        if (free_sends_.empty()) break;
        slot = free_sends_.back();
        free_sends_.pop_back();
        static_cast<SendCtx*>(op)->buf = slot;  // before posting: it may complete at once
      }
      queue_.pop_front();
      credits_--;
    }
    std::string why;
    ssize_t rc;
    {
      // One poster at a time per endpoint: FI_THREAD_SAFE notwithstanding, ofi_rxd corrupts
      // its lists (and then spins on them) when two threads post to one endpoint at once.
      std::lock_guard<std::mutex> serial(post_mu_);
      rc = peer_gone(dest_of(op), &why) ? -FI_ENOTCONN : post(op, slot);
    }
    if (stopping_) return true;  // maybe long after stop() gave up on this thread: touch nothing
    if (rc == 0) continue;
    std::lock_guard<std::mutex> lock(mu_);
    credits_++;
    if (slot >= 0) {
      free_sends_.push_back(slot);
      static_cast<SendCtx*>(op)->buf = -1;
    }
    if (rc == -FI_EAGAIN) {  // back at the head; the completion thread retries after progress
      queue_.push_front(op);
      busy_ = true;
      pushed_back = true;
      break;
    }
    if (why.empty()) {
      why = std::string("posting to ") + describe() + " failed: " + fi_strerror(static_cast<int>(-rc));
    }
    failed.push_back(Failure{op, static_cast<int>(-rc), 0, why});
  }
  report(skipped, failed);
  return !pushed_back;
}

void Rail::report(std::vector<OpCtx*>& skipped, std::vector<Failure>& failed) {
  for (OpCtx* op : skipped) events_.on_skipped(*this, op);
  for (auto& f : failed) events_.on_failed(*this, f.op, f.err, f.prov_errno, f.why);
  skipped.clear();
  failed.clear();
}

void Rail::submit(const std::vector<OpCtx*>& ops) {
  if (stopping_) {
    std::vector<OpCtx*> skipped = ops;
    std::vector<Failure> failed;
    report(skipped, failed);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.insert(queue_.end(), ops.begin(), ops.end());
  }
  const bool busy = post_inline_ ? !pump() : false;
  if (cq_waits_) {
    if (busy) fi_cq_signal(obj_->cq);  // the provider pushed back: have the thread retry soon
  } else if (!ops.empty() || busy) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      kicked_ = true;
    }
    wake_.notify_one();
  }
}

// Drops queued operations of ended transfers without calling into the provider (a thread may
// be stuck in it).
void Rail::kick() {
  std::vector<OpCtx*> skipped;
  std::vector<Failure> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      OpCtx* op = *it;
      if (op->batch && (op->batch->failed.load() || op->batch->cancelled.load())) {
        skipped.push_back(op);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
  }
  report(skipped, failed);
}

void Rail::post_receives() {
  std::vector<RecvCtx*> todo;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    todo.swap(repost_);
  }
  std::vector<RecvCtx*> again;
  for (size_t k = 0; k < todo.size(); ++k) {
    RecvCtx* r = todo[k];
    char* buf = obj_->arena.data() + static_cast<size_t>(r->buf) * kMaxMsgBytes;
    ssize_t rc;
    {
      std::lock_guard<std::mutex> serial(post_mu_);
      rc = fi_recv(obj_->ep, buf, kMaxMsgBytes, arena_desc_, FI_ADDR_UNSPEC, r);
    }
    if (rc == -FI_EAGAIN) {
      again.assign(todo.begin() + static_cast<long>(k), todo.end());
      break;
    }
    if (rc != 0) {
      events_.on_async_error(*this, std::string("posting a receive failed: ") +
                                        fi_strerror(static_cast<int>(-rc)));
    }
  }
  if (!again.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    repost_.insert(repost_.end(), again.begin(), again.end());
  }
}

void Rail::repost(RecvCtx* r) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!stopping_) repost_.push_back(r);
}

void Rail::release(OpCtx* op) {
  std::lock_guard<std::mutex> lock(mu_);
  credits_++;
  if (op->kind == CtxKind::kSend) {
    auto* s = static_cast<SendCtx*>(op);
    if (s->buf >= 0) free_sends_.push_back(s->buf);
    s->buf = -1;
  }
}

std::string Rail::debug_state() {
  std::lock_guard<std::mutex> lock(mu_);
  return domain_name_ + ": queued " + std::to_string(queue_.size()) + ", credits " +
         std::to_string(credits_) + "/" + std::to_string(limits_.tx_depth) + ", send slots " +
         std::to_string(free_sends_.size()) + "/" + std::to_string(send_slots_) +
         ", receives to repost " + std::to_string(repost_.size()) + (busy_ ? ", busy" : "");
}

std::string Rail::strerror_cq(int prov_errno, const void* err_data) const {
  char buf[256] = {0};
  const char* s = fi_cq_strerror(obj_->cq, prov_errno, err_data, buf, sizeof buf);
  return s ? s : "";
}

void Rail::handle(const fi_cq_data_entry& e) {
  if (e.flags & FI_REMOTE_CQ_DATA) {
    events_.on_remote_write(*this, e.data);
    // FI_RX_CQ_DATA providers consumed one of our receives for it.
    if ((limits_.mode & FI_RX_CQ_DATA) && e.op_context) repost(static_cast<RecvCtx*>(e.op_context));
    return;
  }
  auto* op = static_cast<OpCtx*>(e.op_context);
  if (op == nullptr) return;
  if (op->kind == CtxKind::kRecv) {
    auto* r = static_cast<RecvCtx*>(op);
    const char* buf = obj_->arena.data() + static_cast<size_t>(r->buf) * kMaxMsgBytes;
    events_.on_message(*this, buf, std::min<size_t>(e.len, kMaxMsgBytes));
    repost(r);
    return;
  }
  release(op);
  events_.on_done(*this, op);
}

void Rail::handle_error() {
  struct fi_cq_err_entry err{};
  ssize_t rc = fi_cq_readerr(obj_->cq, &err, 0);
  if (rc < 0) return;
  std::string why = fi_strerror(err.err);
  std::string detail = strerror_cq(err.prov_errno, err.err_data);
  if (!detail.empty() && detail != why) why += " (" + detail + ")";
  auto* op = static_cast<OpCtx*>(err.op_context);
  if (op == nullptr) {
    events_.on_async_error(*this, why);
    return;
  }
  if (op->kind == CtxKind::kRecv) {
    if (err.err != FI_ECANCELED) {
      events_.on_async_error(*this, "a receive failed: " + why);
      repost(static_cast<RecvCtx*>(op));
    }
    return;
  }
  release(op);
  events_.on_failed(*this, op, err.err, err.prov_errno, why);
}

void Rail::completion_loop() {
  fi_cq_data_entry entries[kCqBatch];
  auto last_idle = std::chrono::steady_clock::now();
  auto backoff = std::chrono::microseconds(0);
  while (true) {
    int timeout;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) break;
      timeout = (busy_ || !repost_.empty()) ? kBusyWaitMs : kIdleWaitMs;
    }
    ssize_t n;
    if (cq_waits_) {
      n = fi_cq_sread(obj_->cq, entries, kCqBatch, nullptr, timeout);
    } else {
      n = fi_cq_read(obj_->cq, entries, kCqBatch);
      if (n == -FI_EAGAIN) {
        backoff = std::min<std::chrono::microseconds>(
            std::max<std::chrono::microseconds>(backoff * 2, std::chrono::microseconds(10)),
            kMaxBackoff);
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait_for(lock, backoff, [&] { return kicked_ || stopping_; });
        if (kicked_) backoff = std::chrono::microseconds(0);  // new work: look again soon
        kicked_ = false;
      } else {
        backoff = std::chrono::microseconds(0);
      }
    }
    if (stopping_) break;
    if (n > 0) {
      for (ssize_t k = 0; k < n; ++k) handle(entries[k]);
    } else if (n == -FI_EAVAIL) {
      handle_error();
    }
    post_receives();
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = false;
    }
    pump();
    forget_due();
    auto now = std::chrono::steady_clock::now();
    if (now - last_idle > std::chrono::seconds(1)) {
      last_idle = now;
      events_.on_idle(*this);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  exited_ = true;
  exited_cv_.notify_all();
}

void Rail::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) {
    if (obj_ && obj_->cq && cq_waits_) fi_cq_signal(obj_->cq);
    std::unique_lock<std::mutex> lock(mu_);
    bool done = exited_cv_.wait_for(lock, kStopGrace, [&] { return exited_; });
    lock.unlock();
    if (done) {
      thread_.join();
    } else {
      thread_.detach();
      abandoned_ = true;
      std::fprintf(stderr,
                   "kvtransfer: the completion thread of %s is stuck inside the provider; "
                   "leaving this rail's libfabric objects open\n",
                   describe().c_str());
    }
  }
  if (abandoned_ || !obj_) return;
  drain();
  if (shares_local_memory_ && obj_->ep) {
    retire_local();
  } else if (obj_->ep) {
    fi_close(&obj_->ep->fid);
    obj_->ep = nullptr;
  }
}

// ofi_rxm (libfabric 1.17) segfaults inside fi_close(ep) when a connection whose peer was
// killed still has events it has not processed (measured: 1 close in 5 after killing the
// initiator mid-transfer; data the dead peer sent is still being consumed then). Progressing
// the provider until it is quiet lets it take that connection down first. What it reports now
// is dropped: the transfers are being failed by the shutdown anyway.
void Rail::drain() {
  if (!obj_->cq) return;
  fi_cq_data_entry entries[kCqBatch];
  const auto start = std::chrono::steady_clock::now();
  auto last_event = start;
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_event >= kDrainQuiet || now - start >= kDrainLimit) return;
    ssize_t n = fi_cq_read(obj_->cq, entries, kCqBatch);
    if (n == -FI_EAVAIL) {
      struct fi_cq_err_entry err{};
      fi_cq_readerr(obj_->cq, &err, 0);
    }
    if (n > 0 || n == -FI_EAVAIL) {
      last_event = now;
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
}

void Rail::retire_local() {
  std::vector<std::pair<fi_addr_t, std::string>> entries;
  {
    std::lock_guard<std::mutex> serial(av_mu_);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [raw, e] : by_raw_) entries.emplace_back(e.addr, raw);
    by_raw_.clear();
    raw_of_.clear();
    processes_.clear();
    forget_.clear();
  }
  // Our entries go first, while every endpoint they name is still mapped (they wait for us).
  std::vector<std::unique_ptr<RailObjects>> unparked;
  for (auto& [a, raw] : entries) {
    fi_av_remove(obj_->av, &a, 1, 0);
    if (auto parked = LocalPeers::instance().removed(raw)) unparked.push_back(std::move(parked));
  }
  for (auto& o : unparked) o->close();
  obj_ = LocalPeers::instance().retire(address_, std::move(obj_));
  if (obj_ && obj_->ep) {
    fi_close(&obj_->ep->fid);
    obj_->ep = nullptr;
  }
}

void Rail::close() {
  if (abandoned_ || !obj_) return;
  obj_->close();
}

}  // namespace kvt::fabric
