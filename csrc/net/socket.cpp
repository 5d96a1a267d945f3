#include "net/socket.h"

#include <arpa/inet.h>
#include <climits>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace kvt::net {
namespace {

[[noreturn]] void io_fail(const std::string& what, const char* op, int err) {
  if (err == 0) fail(ErrorCode::kTransport, what + ": connection closed by peer during " + op);
  fail(ErrorCode::kTransport, what + ": " + op + " failed: " + std::strerror(err));
}

}  // namespace

size_t advance(struct iovec* iov, size_t n, size_t first, size_t done) {
  while (first < n && done >= iov[first].iov_len) {
    done -= iov[first].iov_len;
    ++first;
  }
  if (first < n && done > 0) {
    iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + done;
    iov[first].iov_len -= done;
  }
  return first;
}

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

Socket::~Socket() {
  if (fd_ >= 0) ::close(fd_);
}

void Socket::shutdown_both() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

void Socket::send_all(const void* data, size_t len, const std::string& what) {
  struct iovec iov{const_cast<void*>(data), len};
  sendv_all(&iov, 1, what);
}

void Socket::recv_all(void* data, size_t len, const std::string& what) {
  struct iovec iov{data, len};
  recvv_all(&iov, 1, what);
}

void Socket::sendv_all(struct iovec* iov, size_t n, const std::string& what) {
  size_t first = 0;
  while (first < n && iov[first].iov_len == 0) ++first;
  while (first < n) {
    struct msghdr msg{};
    msg.msg_iov = iov + first;
    msg.msg_iovlen = std::min<size_t>(n - first, IOV_MAX);
    ssize_t r = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      io_fail(what, "send", errno);
    }
    first = advance(iov, n, first, static_cast<size_t>(r));
  }
}

void Socket::recvv_all(struct iovec* iov, size_t n, const std::string& what) {
  recvv(iov, n, 0, MSG_WAITALL, what);
}

size_t Socket::recvv_now(struct iovec* iov, size_t n, size_t first, const std::string& what) {
  return recvv(iov, n, first, MSG_DONTWAIT, what);
}

// Receives into iov[first..n) until all of it came or, with MSG_DONTWAIT, nothing more is
// queued; returns the new first index.
size_t Socket::recvv(struct iovec* iov, size_t n, size_t first, int flags, const std::string& what) {
  while (first < n && iov[first].iov_len == 0) ++first;
  while (first < n) {
    struct msghdr msg{};
    msg.msg_iov = iov + first;
    msg.msg_iovlen = std::min<size_t>(n - first, IOV_MAX);
    ssize_t r = ::recvmsg(fd_, &msg, flags);
    if (r < 0) {
      if (errno == EINTR) continue;
      if ((flags & MSG_DONTWAIT) && (errno == EAGAIN || errno == EWOULDBLOCK)) return first;
      io_fail(what, "receive", errno);
    }
    if (r == 0) io_fail(what, "receive", 0);
    first = advance(iov, n, first, static_cast<size_t>(r));
  }
  return first;
}

HostPort parse_host_port(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos || colon + 1 == s.size()) {
    fail(ErrorCode::kInvalidRequest, "address '" + s + "' is not of the form host:port");
  }
  HostPort hp;
  hp.host = s.substr(0, colon);
  if (hp.host.size() >= 2 && hp.host.front() == '[' && hp.host.back() == ']') {
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  try {
    size_t used = 0;
    hp.port = std::stoi(s.substr(colon + 1), &used);
    if (used != s.size() - colon - 1 || hp.port < 0 || hp.port > 65535) throw std::out_of_range("");
  } catch (const std::exception&) {
    fail(ErrorCode::kInvalidRequest, "address '" + s + "' has no valid port (0-65535)");
  }
  return hp;
}

static struct addrinfo* resolve(const std::string& host, int port, bool passive) {
  struct addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  struct addrinfo* res = nullptr;
  std::string port_s = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_s.c_str(), &hints, &res);
  if (rc != 0) {
    fail(ErrorCode::kInvalidRequest, "cannot resolve '" + host + "': " + gai_strerror(rc));
  }
  return res;
}

Socket listen_tcp(const std::string& host, int port, int backlog) {
  struct addrinfo* res = resolve(host, port, true);
  int err = 0;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    Socket s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, 0));
    if (!s.valid()) { err = errno; continue; }
    int one = 1;
    ::setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s.fd(), ai->ai_addr, ai->ai_addrlen) == 0 && ::listen(s.fd(), backlog) == 0) {
      ::freeaddrinfo(res);
      return s;
    }
    err = errno;
  }
  ::freeaddrinfo(res);
  fail(ErrorCode::kInvalidRequest, "cannot listen on " + host + ":" + std::to_string(port) + ": " +
                                       std::strerror(err));
}

std::string local_address(const Socket& s) {
  struct sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(s.fd(), reinterpret_cast<sockaddr*>(&ss), &len);
  char host[INET6_ADDRSTRLEN] = {0};
  int port = 0;
  if (ss.ss_family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    ::inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
    return "[" + std::string(host) + "]:" + std::to_string(port);
  }
  auto* a = reinterpret_cast<sockaddr_in*>(&ss);
  ::inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
  port = ntohs(a->sin_port);
  return std::string(host) + ":" + std::to_string(port);
}

Socket connect_tcp(const HostPort& hp, double timeout_s) {
  struct addrinfo* res = resolve(hp.host, hp.port, false);
  std::string target = hp.host + ":" + std::to_string(hp.port);
  int err = ECONNREFUSED;
  for (auto* ai = res; ai; ai = ai->ai_next) {
    Socket s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!s.valid()) { err = errno; continue; }
    int rc = ::connect(s.fd(), ai->ai_addr, ai->ai_addrlen);
    if (rc != 0 && errno == EINPROGRESS) {
      struct pollfd pfd{s.fd(), POLLOUT, 0};
      int pr = ::poll(&pfd, 1, static_cast<int>(timeout_s * 1000));
      if (pr == 0) {
        ::freeaddrinfo(res);
        fail(ErrorCode::kTimeout, "connecting to " + target + " timed out after " +
                                      std::to_string(timeout_s) + " s");
      }
      socklen_t len = sizeof err;
      ::getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
      rc = err == 0 ? 0 : -1;
    } else if (rc != 0) {
      err = errno;
    }
    if (rc == 0) {
      ::fcntl(s.fd(), F_SETFL, ::fcntl(s.fd(), F_GETFL) & ~O_NONBLOCK);
      set_nodelay(s);
      ::freeaddrinfo(res);
      return s;
    }
  }
  ::freeaddrinfo(res);
  fail(ErrorCode::kTransport, "cannot connect to " + target + ": " + std::strerror(err) +
                                  " (is the peer endpoint running and listening there?)");
}

void set_nodelay(const Socket& s) {
  int one = 1;
  ::setsockopt(s.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace kvt::net
