// Thin RAII over TCP sockets: listen, connect with a deadline, and whole-buffer / iovec I/O
// that either completes or throws a TransportError naming the peer.
#pragma once

#include <sys/uio.h>

#include <string>
#include <utility>

namespace kvt::net {

class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  Socket(Socket&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Socket& operator=(Socket&& o) noexcept;
  ~Socket();

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Wakes any thread blocked in I/O on this socket; the fd stays owned until destruction.
  void shutdown_both();

  void send_all(const void* data, size_t len, const std::string& what);
  void recv_all(void* data, size_t len, const std::string& what);
  // Sends/receives every byte described by iov[0..n); modifies the iovec array as it goes.
  void sendv_all(struct iovec* iov, size_t n, const std::string& what);
  void recvv_all(struct iovec* iov, size_t n, const std::string& what);
  // Receives what is queued into iov[first..n) without blocking; returns the new first index
  // (n once all of it came).
  size_t recvv_now(struct iovec* iov, size_t n, size_t first, const std::string& what);

 private:
  size_t recvv(struct iovec* iov, size_t n, size_t first, int flags, const std::string& what);

  int fd_ = -1;
};

struct HostPort {
  std::string host;
  int port = 0;
};

HostPort parse_host_port(const std::string& s);  // "host:port"; throws InvalidRequest
Socket listen_tcp(const std::string& host, int port, int backlog = 128);
std::string local_address(const Socket& s);      // "host:port" actually bound
Socket connect_tcp(const HostPort& hp, double timeout_s);
void set_nodelay(const Socket& s);

// Advances an iovec array past `done` bytes (a short read, write or copy); returns the new
// first index. The entry it stops in is trimmed in place.
size_t advance(struct iovec* iov, size_t n, size_t first, size_t done);

}  // namespace kvt::net
