// An eventfd that one thread signals to wake another out of poll().
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"

namespace kvt::net {

class EventFd {
 public:
  EventFd() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
    if (fd_ < 0) fail(ErrorCode::kTransport, std::string("eventfd failed: ") + std::strerror(errno));
  }
  EventFd(const EventFd&) = delete;
  EventFd& operator=(const EventFd&) = delete;
  ~EventFd() { ::close(fd_); }

  int fd() const { return fd_; }
  void signal() const {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(fd_, &one, sizeof one);  // only fails when it is full
  }
  void clear() const {
    uint64_t count;
    [[maybe_unused]] ssize_t n = ::read(fd_, &count, sizeof count);  // EAGAIN: already clear
  }

 private:
  int fd_;
};

}  // namespace kvt::net
