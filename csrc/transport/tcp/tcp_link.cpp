#include "transport/tcp/tcp_link.h"

#include <algorithm>

#include "transport/tcp/tcp_transport.h"

namespace kvt::tcp {
namespace {

class TcpPrepared : public PreparedOp {
 public:
  std::vector<Frame> frames;
};

uint64_t frame_bytes(const Frame& f) { return f.header.payload; }

// What a frame adds to its connection's queued_bytes: its payload plus a rough head, so that
// frames of no payload (read requests) still spread over the connections.
uint64_t queue_charge(const Frame& f) { return frame_bytes(f) + 64; }

// A transfer too large for a reading waiter's frame is cut into at least one frame per
// connection, so a 1 MiB layer moves over all of them at once instead of at one stream's speed.
uint64_t frame_cap(uint64_t total, size_t connections) {
  if (total <= kWaiterFrameBytes || connections < 2) return kMaxFrameBytes;
  const uint64_t share = (total + connections - 1) / connections;
  return std::min(kMaxFrameBytes, (share + 4095) & ~uint64_t{4095});
}

}  // namespace

TcpLink::TcpLink(TransportSink& sink, uint64_t peer, std::vector<net::Socket> sockets)
    : sink_(sink), peer_(peer) {
  for (auto& s : sockets) {
    auto c = std::make_unique<Conn>();
    c->sock = std::move(s);
    conns_.push_back(std::move(c));
  }
  for (auto& c : conns_) {
    Conn* cp = c.get();
    threads_.spawn("kvt-tcp-send", [this, cp] { send_loop(*cp); });
    threads_.spawn("kvt-tcp-reply", [this, cp] { recv_loop(*cp); });
  }
}

TcpLink::~TcpLink() { close(); }

std::unique_ptr<PreparedOp> TcpLink::prepare(OpRequest op) {
  auto prepared = std::make_unique<TcpPrepared>();
  auto& frames = prepared->frames;
  const bool write = op.kind == OpKind::kWrite;
  auto open_frame = [&] {
    Frame f;
    f.header.type = write ? wire::DataType::kWrite : wire::DataType::kReadReq;
    f.header.slot = op.slot;
    f.header.region = op.remote.id;
    f.header.key = op.remote.key;
    f.header.frame = static_cast<uint32_t>(frames.size());
    f.header.flags = op.checksum ? wire::kFlagPayloadCrc : 0;
    f.hold = op.local;
    frames.push_back(std::move(f));
  };
  open_frame();
  const uint64_t cap = frame_cap(op.bytes, conns_.size());
  char* base = op.local->base;
  for (const Segment& s : op.segments) {
    uint64_t local_off = write ? s.src_off : s.dst_off;
    uint64_t remote_off = write ? s.dst_off : s.src_off;
    uint64_t done = 0;
    while (done < s.len) {
      Frame* f = &frames.back();
      if (f->header.payload == cap || f->remote.size() == kMaxSegsPerFrame) {
        open_frame();
        f = &frames.back();
      }
      uint64_t piece = std::min(s.len - done, cap - f->header.payload);
      f->remote.push_back(wire::DataDesc{remote_off + done, piece});
      f->local.push_back(iovec{base + local_off + done, piece});
      f->header.payload += piece;
      done += piece;
    }
  }
  if (frames.back().remote.empty()) frames.pop_back();
  for (auto& f : frames) f.header.nseg = static_cast<uint32_t>(f.remote.size());
  prepared->units = static_cast<uint32_t>(frames.size());
  return prepared;
}

void TcpLink::post(std::unique_ptr<PreparedOp> op) {
  auto& frames = static_cast<TcpPrepared&>(*op).frames;
  if (failed_.load() || closed_.load()) {
    if (!frames.empty()) {
      sink_.on_op_failed(frames.front().header.slot,
                         Error(ErrorCode::kTransport, "data connection to peer is closed"));
    }
    return;
  }
  if (!op->begin.empty()) frames.front().begin = std::move(op->begin);
  // Each frame goes to the connection with the fewest bytes queued, so a large transfer is
  // striped over all of them while a small one stays on one. All are placed before any is
  // sent: a sender thread that finished a frame meanwhile must not draw the next one back.
  // The placement's scratch is the posting thread's own: no allocation on a write's path.
  thread_local std::vector<uint64_t> load;
  thread_local std::vector<Conn*> to;
  load.resize(conns_.size());
  for (size_t i = 0; i < conns_.size(); ++i) {
    std::lock_guard<std::mutex> lock(conns_[i]->mu);
    load[i] = conns_[i]->queued_bytes;
  }
  to.resize(frames.size());
  for (size_t k = 0; k < frames.size(); ++k) {
    size_t best = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    load[best] += queue_charge(frames[k]);
    to[k] = conns_[best].get();
  }
  for (size_t k = 0; k < frames.size(); ++k) {
    Conn& c = *to[k];
    bool inline_send = false;
    {
      std::lock_guard<std::mutex> lock(c.mu);
      c.queued_bytes += queue_charge(frames[k]);
      // The op's last frame, on an idle connection: send it from this thread, saving the
      // hand-off to the sender thread (a wake-up on the latency path of small transfers);
      // the sender threads of the others, woken first, send theirs meanwhile.
      inline_send = k + 1 == frames.size() && c.queue.empty() && !c.sending;
      if (inline_send) {
        c.sending = true;
      } else {
        c.queue.push_back(std::move(frames[k]));
      }
    }
    if (inline_send) {
      send_frame(c, std::move(frames[k]));
    } else {
      c.cv.notify_one();
    }
  }
}

void TcpLink::send_loop(Conn& c) {
  while (true) {
    Frame f;
    {
      std::unique_lock<std::mutex> lock(c.mu);
      c.cv.wait(lock, [&] { return closed_.load() || (!c.queue.empty() && !c.sending); });
      if (closed_.load()) return;
      f = std::move(c.queue.front());
      c.queue.pop_front();
      c.sending = true;
    }
    if (!send_frame(c, std::move(f))) return;
  }
}

// Sends one frame; the caller set c.sending, which this clears. False once the link broke.
bool TcpLink::send_frame(Conn& c, Frame f) {
  uint8_t header[wire::kDataHeaderSize];
  uint8_t crc_le[4];
  uint8_t begin_header[wire::kDataHeaderSize];
  uint8_t begin_crc_le[4];
  const uint64_t charge = queue_charge(f);
  bool ok = true;
  try {
    wire::encode_data_header(f.header, f.remote.data(), header);
    c.descs.resize(f.remote.size() * wire::kDataDescSize);
    wire::encode_descs(f.remote.data(), f.header.nseg, c.descs.data());
    c.iov.clear();
    if (!f.begin.empty()) {
      wire::DataHeader bh;
      bh.type = wire::DataType::kBegin;
      bh.flags = wire::kFlagPayloadCrc;
      bh.slot = f.header.slot;
      bh.payload = f.begin.size();
      wire::encode_data_header(bh, nullptr, begin_header);
      wire::put_u32_le(begin_crc_le, wire::crc32c(f.begin.data(), f.begin.size()));
      c.iov.push_back(iovec{begin_header, sizeof begin_header});
      c.iov.push_back(iovec{f.begin.data(), f.begin.size()});
      c.iov.push_back(iovec{begin_crc_le, 4});
    }
    c.iov.push_back(iovec{header, sizeof header});
    c.iov.push_back(iovec{c.descs.data(), c.descs.size()});
    if (f.header.type == wire::DataType::kWrite) {
      c.iov.insert(c.iov.end(), f.local.begin(), f.local.end());
      if (f.header.flags & wire::kFlagPayloadCrc) {
        wire::put_u32_le(crc_le, wire::crc32c_iov(f.local.data(), f.local.size()));
        c.iov.push_back(iovec{crc_le, 4});
      }
    } else {
      std::lock_guard<std::mutex> lock(c.reads_mu);
      auto key = std::make_pair(f.header.slot, f.header.frame);
      c.reads.emplace(key, std::move(f));
    }
    c.sock.sendv_all(c.iov.data(), c.iov.size(), kDataConnection);
  } catch (const Error& e) {
    broken(e);
    ok = false;
  }
  bool more;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.queued_bytes -= charge;
    c.sending = false;
    more = !c.queue.empty();
  }
  // Frames queued meanwhile wait for the sender thread; with none, waking it would cost an
  // inline poster a futex wake and a context switch for nothing.
  if (more) c.cv.notify_one();
  return ok;
}

void TcpLink::recv_loop(Conn& c) {
  uint8_t header[wire::kDataHeaderSize];
  std::string reason;
  try {
    while (!closed_.load()) {
      c.sock.recv_all(header, sizeof header, kDataConnection);
      wire::DataHeader h = wire::decode_data_header(header);
      wire::verify_data_crc(header, nullptr, 0);
      if (h.type == wire::DataType::kReadErr) {
        if (h.payload > wire::kMaxReadErrBytes) fail(ErrorCode::kProtocol, "oversized read error");
        reason.resize(h.payload);
        c.sock.recv_all(reason.data(), reason.size(), kDataConnection);
        {
          std::lock_guard<std::mutex> lock(c.reads_mu);
          c.reads.erase({h.slot, h.frame});
        }
        sink_.on_op_failed(h.slot, Error(ErrorCode::kInvalidRequest, "peer refused read: " + reason));
        continue;
      }
      if (h.type != wire::DataType::kReadResp || h.nseg != 0) {
        fail(ErrorCode::kProtocol, "unexpected data frame type from the target");
      }
      Frame f;
      {
        std::lock_guard<std::mutex> lock(c.reads_mu);
        auto it = c.reads.find({h.slot, h.frame});
        if (it == c.reads.end()) fail(ErrorCode::kProtocol, "read reply for a frame never asked for");
        f = std::move(it->second);
        c.reads.erase(it);
      }
      if (h.payload != frame_bytes(f)) {
        fail(ErrorCode::kProtocol, "read reply of " + std::to_string(h.payload) +
                                       " bytes for a request of " + std::to_string(frame_bytes(f)));
      }
      std::vector<struct iovec> dst = f.local;  // recvv_all consumes its iovec array
      c.sock.recvv_all(dst.data(), dst.size(), kDataConnection);
      if (h.flags & wire::kFlagPayloadCrc) {
        uint8_t crc_le[4];
        c.sock.recv_all(crc_le, 4, kDataConnection);
        if (wire::get_u32_le(crc_le) != wire::crc32c_iov(f.local.data(), f.local.size())) {
          sink_.on_op_failed(h.slot, Error(ErrorCode::kProtocol,
                                           "read payload of transfer " + std::to_string(h.slot) +
                                               " (frame " + std::to_string(h.frame) +
                                               ") fails its crc32c: corrupted in flight"));
          continue;
        }
      }
      sink_.on_read_landed(h.slot, 1);
    }
  } catch (const Error& e) {
    if (!closed_.load()) broken(e);
  }
}

void TcpLink::broken(const Error& e) {
  if (failed_.exchange(true) || closed_.load()) return;
  for (auto& c : conns_) c->sock.shutdown_both();
  sink_.on_link_failed(peer_, e);
}

void TcpLink::close() {
  if (closed_.exchange(true)) return;
  for (auto& c : conns_) {
    c->sock.shutdown_both();
    { std::lock_guard<std::mutex> lock(c->mu); }
    c->cv.notify_all();
  }
  threads_.join_all();
}

}  // namespace kvt::tcp
