// What an initiator needs to reach a cma target, and to tell at once that it cannot: the host
// (boot_id: the same kernel) and the target's abstract socket. Encoded as text
// "cma1 boot=<boot_id> pid=<pid> sock=<name>".
#pragma once

#include <string>

namespace kvt::cma {

struct CmaAddress {
  std::string boot_id;
  int pid = 0;         // as the target sees itself (the socket tells the initiator's view)
  std::string socket;  // abstract unix socket name, without the leading NUL
};

std::string encode_address(const CmaAddress& a);
// Throws Protocol when `s` is not a cma address.
CmaAddress parse_address(const std::string& s);
// This kernel's boot id (/proc/sys/kernel/random/boot_id); throws Transport when unreadable.
std::string this_boot_id();

}  // namespace kvt::cma
