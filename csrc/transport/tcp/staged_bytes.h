// Bytes that a spinning waiter took off a TCP data connection in one receive and that nobody
// has acted on yet. It receives a small write's heads and payload together and copies the
// payload into place: one system call where a peek and a receive into place took two, and the
// second one, made while the sender's sendmsg is still in the kernel, cost ~6-10 us of the
// bench's 64 KiB write -> notified (docs/transports.md). Whoever reads the connection next,
// a waiter or the connection's thread, takes these bytes first, so frames that the receive cut
// anywhere are read whole either way.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "net/socket.h"

namespace kvt::tcp {

class StagedBytes {
 public:
  // Room for a 64 KiB write with its BEGIN and heads; a larger payload is staged in part, the
  // rest received into place.
  static constexpr size_t kCapacity = 80u << 10;

  size_t size() const { return end_ - begin_; }
  const uint8_t* data() const { return buf_.data() + begin_; }
  void consume(size_t n);
  void clear() { begin_ = end_ = 0; }

  // Receives what `s` has queued, after what is staged, without blocking: the bytes added, 0
  // when nothing is queued, -1 at end of file. Throws TransportError if the socket failed.
  ssize_t receive_now(const net::Socket& s, const std::string& what);
  // Copies staged bytes into iov[first..n), trimming the entries in place (net::advance);
  // returns the new first index.
  size_t fill(struct iovec* iov, size_t n, size_t first);

 private:
  std::vector<uint8_t> buf_;  // allocated by the first receive: only waiters stage
  size_t begin_ = 0, end_ = 0;
};

}  // namespace kvt::tcp
