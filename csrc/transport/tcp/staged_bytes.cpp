#include "transport/tcp/staged_bytes.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace kvt::tcp {

void StagedBytes::consume(size_t n) {
  begin_ += std::min(n, size());
  if (begin_ == end_) clear();
}

ssize_t StagedBytes::receive_now(const net::Socket& s, const std::string& what) {
  if (buf_.empty()) buf_.resize(kCapacity);
  if (begin_ > 0) {  // a frame's start waits for its rest: keep it in front
    std::memmove(buf_.data(), buf_.data() + begin_, size());
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ == buf_.size()) return 0;
  while (true) {
    ssize_t r = ::recv(s.fd(), buf_.data() + end_, buf_.size() - end_, MSG_DONTWAIT);
    if (r > 0) {
      end_ += static_cast<size_t>(r);
      return r;
    }
    if (r == 0) return -1;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    fail(ErrorCode::kTransport, what + ": receive failed: " + std::strerror(errno));
  }
}

size_t StagedBytes::fill(struct iovec* iov, size_t n, size_t first) {
  size_t copied = 0;
  for (size_t i = first; i < n && copied < size(); ++i) {
    const size_t take = std::min(iov[i].iov_len, size() - copied);
    std::memcpy(iov[i].iov_base, data() + copied, take);
    copied += take;
  }
  consume(copied);
  return net::advance(iov, n, first, copied);
}

}  // namespace kvt::tcp
