#include "net/loopback_floor.h"

#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"
#include "net/socket.h"

namespace kvt::net {
namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

}  // namespace

std::vector<double> tcp_oneway_seconds(size_t nbytes, int reps, int gap_us, bool busy) {
  if (nbytes == 0 || reps <= 0 || gap_us < 0) {
    fail(ErrorCode::kInvalidRequest, "the loopback floor needs nbytes > 0, reps > 0, gap_us >= 0");
  }
  Socket listener = listen_tcp("127.0.0.1", 0, 1);
  Socket out = connect_tcp(parse_host_port(local_address(listener)), 5.0);
  int fd = ::accept4(listener.fd(), nullptr, nullptr, SOCK_CLOEXEC);
  if (fd < 0) fail(ErrorCode::kTransport, std::string("loopback floor: accept: ") + std::strerror(errno));
  Socket in(fd);
  set_nodelay(out);
  set_nodelay(in);

  std::mutex mu;
  std::condition_variable cv;
  int armed = -1;        // under mu: the rep the receiver is ready for
  std::string failure;   // under mu: why the sender stopped
  std::atomic<int64_t> sent_at{0};
  std::thread sender([&] {
    std::vector<char> src(nbytes, 7);
    try {
      for (int r = 0; r < reps; ++r) {
        {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return armed >= r; });
        }
        const auto gap = std::chrono::microseconds(gap_us);
        if (busy) {
          for (auto until = Clock::now() + gap; Clock::now() < until;) {
          }
        } else {
          std::this_thread::sleep_for(gap);
        }
        sent_at.store(now_ns());
        out.send_all(src.data(), nbytes, "loopback floor");
      }
    } catch (const Error& e) {
      std::lock_guard<std::mutex> lock(mu);
      failure = e.what();
      in.shutdown_both();
    }
  });

  std::vector<char> dst(nbytes);
  std::vector<double> times;
  times.reserve(static_cast<size_t>(reps));
  for (int r = 0; r < reps; ++r) {
    std::memset(dst.data(), 0xAA, nbytes);
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure.empty()) break;
      armed = r;
    }
    cv.notify_one();
    size_t got = 0;
    while (got < nbytes) {
      ssize_t n = ::recv(in.fd(), dst.data() + got, nbytes - got, MSG_DONTWAIT);
      if (n > 0) {
        got += static_cast<size_t>(n);
      } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        break;  // the sender failed and shut the socket: its error is reported below
      }
    }
    if (got == nbytes) times.push_back(static_cast<double>(now_ns() - sent_at.load()) * 1e-9);
  }
  in.shutdown_both();  // a sender still sending (the receiver stopped early) fails out of it
  {
    std::lock_guard<std::mutex> lock(mu);
    armed = reps;  // and one waiting for its turn goes on to that
  }
  cv.notify_one();
  sender.join();
  if (!failure.empty()) fail(ErrorCode::kTransport, "loopback floor: " + failure);
  return times;
}

}  // namespace kvt::net
