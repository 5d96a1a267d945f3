// Endpoints of one process that address each other through a provider that shares memory.
//
// shm (and EFA, whose peers on the same host go through shm) does not map the region of a peer
// that lives in the same process a second time: it uses that endpoint's own mapping. Closing
// an endpoint unmaps its region under every other endpoint of the process that still has it in
// its address vector, and their progress then reads unmapped memory (libfabric 1.17: SIGSEGV in
// fi_cq_read on the peer's completion thread, seen when a test closed the initiator of a
// same-process pair while the target's thread was still answering its last commands).
//
// So such an endpoint is closed only once no other endpoint of this process has its address in
// its address vector. Until then it is parked: its completion thread stopped, its own address
// vector emptied, its libfabric objects open. The rail that removes the last entry naming it
// (after the AV grace period, or when that rail itself closes) closes it. A parked endpoint
// counts as gone for the rails that still address it, so their transfers to it fail at once.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/fabric/fabric_api.h"
#include "transport/fabric/fabric_ops.h"

namespace kvt::fabric {

// A rail's libfabric objects and the memory its posted receives point into, closed in order.
struct RailObjects {
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_cq* cq = nullptr;
  fid_av* av = nullptr;
  fid_ep* ep = nullptr;
  fid_mr* arena_mr = nullptr;
  std::vector<char> arena;
  std::vector<RecvCtx> recvs;
  void close();
};

class LocalPeers {
 public:
  static LocalPeers& instance();

  // A rail of a sharing provider opened with this address.
  void opened(const std::string& address);
  // Some rail put `address` into its address vector / removed it from there. Removing the last
  // entry that names a parked endpoint hands back its objects, for the caller to close (outside
  // its own locks).
  void inserted(const std::string& address);
  std::unique_ptr<RailObjects> removed(const std::string& address);
  // The endpoint behind `address` is parked (closed by its owner).
  bool parked(const std::string& address);
  // The owner closes its rail, whose own AV is already empty: nullptr when it may close the
  // objects now, else they are parked here and closed by the last removed().
  std::unique_ptr<RailObjects> retire(const std::string& address, std::unique_ptr<RailObjects> objects);

 private:
  struct Entry {
    size_t holders = 0;  // entries naming it in other rails' address vectors
    std::unique_ptr<RailObjects> parked;
  };
  std::mutex mu_;
  std::map<std::string, Entry> entries_;  // by raw address
};

}  // namespace kvt::fabric
