// What the transport posts: every operation's context starts with the provider's scratch space
// (so FI_CONTEXT / FI_CONTEXT2 modes are honoured) and says what it is. A transfer's units live
// in one Batch until the last of them completed, failed or was skipped, so the memory they
// name stays registered (Batch::hold) for as long as the provider may touch it.
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/region_registry.h"
#include "transport/fabric/fabric_api.h"
#include "transport/transport.h"

namespace kvt::fabric {

enum class CtxKind : uint8_t { kWrite, kRead, kSend, kRecv };

struct Batch;

struct OpCtx {
  struct fi_context2 fi{};  // first: the provider's per-operation scratch space
  CtxKind kind = CtxKind::kSend;
  Batch* batch = nullptr;  // the transfer this op belongs to (none: hello traffic, receives)
  explicit OpCtx(CtxKind k) : kind(k) {}
  virtual ~OpCtx() = default;
};

// One fi_writemsg / fi_readmsg: at most iov_limit local and rma_iov_limit remote pieces, at
// most max_msg_size bytes. Its arrays stay put until completion (FI_ASYNC_IOV).
struct Unit : OpCtx {
  Unit() : OpCtx(CtxKind::kWrite) {}
  uint32_t rail = 0;  // local rail it is posted on
  fi_addr_t dest = FI_ADDR_UNSPEC;
  uint64_t imm = 0;
  std::vector<struct iovec> iov;
  std::vector<void*> desc;
  std::vector<struct fi_rma_iov> rma;
};

struct SendCtx : OpCtx {
  SendCtx() : OpCtx(CtxKind::kSend) {}
  fi_addr_t dest = FI_ADDR_UNSPEC;
  std::string bytes;
  int buf = -1;  // send slot while posted
};

struct RecvCtx : OpCtx {
  RecvCtx() : OpCtx(CtxKind::kRecv) {}
  int buf = -1;
};

struct Batch {
  uint64_t slot = 0;
  OpKind kind = OpKind::kWrite;
  uint64_t link = 0;
  uint64_t peer = 0;  // the Endpoint's peer session (for on_link_failed)
  uint32_t region = 0;  // the target region
  uint32_t tag = 0;   // the session's tag at the target, and this transfer's n there
  uint32_t seq = 0;
  fi_addr_t target = FI_ADDR_UNSPEC;  // the target's rail 0 (for MAP / READ-BEGIN / RELEASE)
  std::shared_ptr<const Region> hold;
  std::vector<Unit> units;  // never resized once posted
  SendCtx map;              // MAP (writes) or READ-BEGIN (reads), posted before the units
  std::atomic<uint32_t> pending{0};     // ops posted or queued, not yet finished
  std::atomic<bool> failed{false};      // an error was reported: post nothing more of it
  std::atomic<bool> cancelled{false};   // its link closed: post nothing, report nothing
};

}  // namespace kvt::fabric
