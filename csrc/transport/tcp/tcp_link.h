// The initiator's side of the TCP data path to one peer.
#pragma once

#include <sys/uio.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/thread_set.h"
#include "net/socket.h"
#include "transport/transport.h"
#include "wire/crc32c.h"
#include "wire/data_frame.h"

namespace kvt::tcp {

struct Frame {
  wire::DataHeader header;
  std::vector<wire::DataDesc> remote;  // offsets in the target region
  std::vector<struct iovec> local;     // write: source bytes; read: where the reply lands
  std::shared_ptr<const Region> hold;  // keeps local memory registered until the frame is done
  std::string begin;                   // a BEGIN body sent ahead of it as a kBegin frame
};

class TcpLink : public DataLink {
 public:
  TcpLink(TransportSink& sink, uint64_t peer, std::vector<net::Socket> sockets);
  ~TcpLink() override;
  std::unique_ptr<PreparedOp> prepare(OpRequest op) override;
  void post(std::unique_ptr<PreparedOp> op) override;
  void close() override;

 private:
  struct Conn {
    net::Socket sock;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Frame> queue;
    uint64_t queued_bytes = 0;
    bool sending = false;  // a thread is writing to the socket (sender thread or a poster)
    std::vector<struct iovec> iov;  // scratch of the thread that holds `sending`
    std::vector<uint8_t> descs;
    std::mutex reads_mu;
    std::map<std::pair<uint64_t, uint32_t>, Frame> reads;  // (slot, frame) awaiting its reply
  };
  void send_loop(Conn& c);
  bool send_frame(Conn& c, Frame f);
  void recv_loop(Conn& c);
  void broken(const Error& e);

  TransportSink& sink_;
  uint64_t peer_;
  std::vector<std::unique_ptr<Conn>> conns_;
  std::atomic<bool> closed_{false};
  std::atomic<bool> failed_{false};
  ThreadSet threads_;
};

}  // namespace kvt::tcp
