// The initiator's side of the cma data path to one target process: operations are cut into
// units of at most kMaxUnitIovecs iovecs / kMaxUnitBytes bytes, which `workers` threads copy
// with process_vm_writev / process_vm_readv (an idle link copies a one-unit op on the posting
// thread instead, saving a wake-up on the latency path). Each unit is checked against the
// target's shared region table and marked in flight on this session's busy board while it
// copies (cma_region_table.h). When an op's last unit has landed, one record tells the target
// (writes): in the session's arrival ring while a waiter of the target polls it, else on the
// session socket (cma_arrival_ring.h). Reads complete here.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "core/thread_set.h"
#include "net/socket.h"
#include "transport/cma/cma_region_table.h"
#include "transport/transport.h"

namespace kvt::cma {

constexpr uint32_t kMaxUnitIovecs = 1024;  // IOV_MAX: the most one process_vm_* call takes
constexpr uint64_t kMaxUnitBytes = 2u << 20;

struct CmaOp;

class CmaLink : public DataLink {
 public:
  CmaLink(TransportSink& sink, uint64_t peer, net::Socket sock, pid_t pid,
          std::unique_ptr<RegionTableView> table, int workers);
  ~CmaLink() override;
  std::unique_ptr<PreparedOp> prepare(OpRequest op) override;
  void post(std::unique_ptr<PreparedOp> op) override;
  void close() override;

 private:
  void worker_loop();
  // Copies unit i of op unless the link stopped; reports the op when it is its last unit.
  void run_unit(CmaOp& op, uint32_t i);
  void copy_unit(CmaOp& op, uint32_t i);
  void fail_op(CmaOp& op, const Error& e);
  bool tell_in_ring(const CmaOp& op);
  void watch_loop();
  void broken(const Error& e);
  void quiesce();  // stops new copies and waits for those under way

  TransportSink& sink_;
  uint64_t peer_;
  net::Socket sock_;
  pid_t pid_;
  std::unique_ptr<RegionTableView> table_;
  std::unique_ptr<ArrivalRing> ring_;  // null when the target's board has none
  std::mutex ring_mu_;                 // one writer at a time

  std::mutex mu_;
  std::condition_variable cv_;       // work queued, or the link stopped
  std::condition_variable idle_cv_;  // a copy ended (copying_ dropped)
  std::deque<std::shared_ptr<CmaOp>> queue_;
  int copying_ = 0;                  // copies under way; the socket closes only at 0
  bool stopped_ = false;             // closed or broken: no copy starts any more
  std::atomic<bool> closed_{false};
  std::atomic<bool> failed_{false};
  ThreadSet threads_;
};

}  // namespace kvt::cma
