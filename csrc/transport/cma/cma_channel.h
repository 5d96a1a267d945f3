// The cma transport's only socket: a unix SOCK_SEQPACKET connection in the abstract namespace
// (so it is reachable only from the same network namespace), carrying small records - the
// session hello, the welcome with the region table's and busy board's memfds (SCM_RIGHTS),
// then "units of transfer S landed" (unless the arrival ring carries them) and refusals from
// initiator to target. Its end of file is how each side learns the other is gone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "net/socket.h"
#include "wire/data_frame.h"

namespace kvt::cma {

enum class MsgType : uint32_t {
  kHello = 1,    // initiator -> target: slot = session token
  kWelcome = 2,  // target -> initiator: two fds (table, busy board)
  kDenied = 3,   // target -> initiator: text says why
  kArrived = 4,  // initiator -> target: arg units of transfer `slot` are in target memory;
                 // text, when not empty, is the transfer's BEGIN (TransportCaps::carries_begin)
  kRefused = 5,  // initiator -> target: transfer `slot` refused (arg: ErrorCode), text says why
  kBegin = 6,    // initiator -> target: text is the BEGIN of a carried-BEGIN op that failed,
                 // ahead of its kRefused, so the target can fail the transfer it names
  kDoorbell = 7,  // initiator -> target: records wait in the arrival ring (cma_arrival_ring.h)
};

struct Msg {
  MsgType type = MsgType::kHello;
  uint32_t arg = 0;
  uint64_t slot = 0;
  std::string text;      // at most kMaxText bytes
  std::vector<int> fds;  // received descriptors, owned by the receiver
};

constexpr size_t kMaxText = 8192;
static_assert(kMaxText >= wire::kMaxBeginBytes, "a BEGIN body must fit in one record");

net::Socket listen_abstract(const std::string& name);
// Connects to abstract socket `name`; throws TransportError saying what the failure means.
net::Socket connect_abstract(const std::string& name, double timeout_s);
// One record; throws TransportError when the socket is broken.
void send_msg(const net::Socket& s, MsgType type, uint32_t arg, uint64_t slot,
              const std::string& text = "", const std::vector<int>& fds = {});
// One record; false at end of file. Throws on errors and malformed records.
bool recv_msg(const net::Socket& s, Msg& out);
enum class Received { kRecord, kNothing, kEnd };
// One record if one is queued, without blocking; throws as recv_msg does.
Received recv_msg_now(const net::Socket& s, Msg& out);
// The pid of the process at the other end (as seen from this pid namespace; 0 if invisible).
int peer_pid(const net::Socket& s);
void set_recv_timeout(const net::Socket& s, double seconds);

}  // namespace kvt::cma
