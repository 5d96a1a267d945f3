// A framed, checksummed message stream over one TCP socket: the handshake and every control
// message between two endpoints travel here, whatever the data transport is.
#pragma once

#include <mutex>
#include <string>
#include <utility>

#include "net/socket.h"
#include "wire/control.h"

namespace kvt {

struct ControlMessage {
  wire::MsgType type;
  uint16_t version;
  std::string body;
};

class ControlChannel {
 public:
  ControlChannel(net::Socket sock, std::string what) : sock_(std::move(sock)), what_(std::move(what)) {}
  void send(wire::MsgType type, const std::string& body);
  // Blocks for the next message; throws Transport on a closed socket, Protocol on a bad frame.
  ControlMessage recv();
  // Bounds blocking: `seconds` <= 0 means no limit.
  void set_timeouts(double recv_s, double send_s);
  void shutdown() { sock_.shutdown_both(); }
  const std::string& what() const { return what_; }

 private:
  net::Socket sock_;
  std::string what_;
  std::mutex send_mu_;
};

}  // namespace kvt
