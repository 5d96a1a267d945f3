#include "engine/control_channel.h"

#include <sys/socket.h>
#include <sys/time.h>

namespace kvt {
namespace {

void set_timeout(int fd, int opt, double seconds) {
  struct timeval tv{};
  if (seconds > 0) {
    tv.tv_sec = static_cast<time_t>(seconds);
    tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  }
  ::setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv);
}

}  // namespace

void ControlChannel::send(wire::MsgType type, const std::string& body) {
  std::string frame = wire::encode_control(type, body);
  std::lock_guard<std::mutex> lock(send_mu_);
  sock_.send_all(frame.data(), frame.size(), what_);
}

ControlMessage ControlChannel::recv() {
  uint8_t header[wire::kControlHeaderSize];
  sock_.recv_all(header, sizeof header, what_);
  wire::ControlHeader h = wire::decode_control_header(header);
  ControlMessage m{h.type, h.version, std::string(h.length, '\0')};
  sock_.recv_all(m.body.data(), m.body.size(), what_);
  wire::verify_control_body(h, m.body);
  return m;
}

void ControlChannel::set_timeouts(double recv_s, double send_s) {
  set_timeout(sock_.fd(), SO_RCVTIMEO, recv_s);
  set_timeout(sock_.fd(), SO_SNDTIMEO, send_s);
}

}  // namespace kvt
