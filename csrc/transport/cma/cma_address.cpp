#include "transport/cma/cma_address.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace kvt::cma {

std::string encode_address(const CmaAddress& a) {
  return "cma1 boot=" + a.boot_id + " pid=" + std::to_string(a.pid) + " sock=" + a.socket;
}

CmaAddress parse_address(const std::string& s) {
  std::istringstream in(s);
  std::string word;
  CmaAddress a;
  bool tagged = false;
  while (in >> word) {
    if (word == "cma1") {
      tagged = true;
    } else if (word.rfind("boot=", 0) == 0) {
      a.boot_id = word.substr(5);
    } else if (word.rfind("pid=", 0) == 0) {
      try {
        a.pid = std::stoi(word.substr(4));
      } catch (const std::exception&) {
        a.pid = 0;
      }
    } else if (word.rfind("sock=", 0) == 0) {
      a.socket = word.substr(5);
    }
  }
  if (!tagged || a.boot_id.empty() || a.pid <= 0 || a.socket.empty()) {
    fail(ErrorCode::kProtocol, "cma: the peer's transport address '" + s.substr(0, 200) +
                                   "' is not a cma address");
  }
  return a;
}

std::string this_boot_id() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (!(f >> id) || id.empty()) {
    fail(ErrorCode::kTransport,
         "cma: cannot read /proc/sys/kernel/random/boot_id, which tells whether a peer runs on "
         "this host (is /proc mounted?)");
  }
  return id;
}

}  // namespace kvt::cma
