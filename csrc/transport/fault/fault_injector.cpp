#include "transport/fault/fault_injector.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <sstream>
#include <thread>

#include "core/thread_set.h"

namespace kvt::fault {
namespace {

class FaultPrepared : public PreparedOp {
 public:
  std::unique_ptr<PreparedOp> inner;
  uint64_t slot = 0;
  uint64_t bytes = 0;
};

// A data link that reorders, delays and drops what it posts to the real one. Delayed posts go
// through one thread that sleeps until each is due (a blocking wait, no spinning).
class FaultLink : public DataLink {
 public:
  FaultLink(FaultInjector& owner, TransportSink& sink, uint64_t peer, std::unique_ptr<DataLink> inner)
      : owner_(owner), sink_(sink), peer_(peer), inner_(std::move(inner)), rng_(owner.next_seed()) {
    if (owner_.spec().delay_ms > 0) threads_.spawn("kvt-fault-delay", [this] { delay_loop(); });
  }
  ~FaultLink() override { close(); }

  std::unique_ptr<PreparedOp> prepare(OpRequest op) override {
    auto p = std::make_unique<FaultPrepared>();
    p->slot = op.slot;
    for (const auto& s : op.segments) p->bytes += s.len;
    if (owner_.spec().reorder) std::shuffle(op.segments.begin(), op.segments.end(), rng_);
    if (owner_.spec().corrupt_key) {
      op.remote.key ^= 0x5A5A5A5A5A5A5A5Aull;
      for (auto& c : op.remote.rkey) c = static_cast<char>(c ^ 0x5A);
    }
    p->inner = inner_->prepare(std::move(op));
    p->units = p->inner->units;
    return p;
  }

  void post(std::unique_ptr<PreparedOp> op) override {
    if (owner_.spec().delay_ms <= 0) {
      deliver(std::unique_ptr<FaultPrepared>(static_cast<FaultPrepared*>(op.release())));
      return;
    }
    auto due = std::chrono::steady_clock::now() +
               std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                   std::chrono::duration<double, std::milli>(owner_.spec().delay_ms));
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.emplace_back(due, std::unique_ptr<FaultPrepared>(static_cast<FaultPrepared*>(op.release())));
    }
    cv_.notify_one();
  }

  void close() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    cv_.notify_all();
    threads_.join_all();
    inner_->close();
  }

 private:
  void deliver(std::unique_ptr<FaultPrepared> p) {
    const uint64_t limit = owner_.spec().drop_after_bytes;
    if (dropped_) {
      sink_.on_op_failed(p->slot, Error(ErrorCode::kTransport, "fault injection: link dropped"));
      return;
    }
    uint64_t slot = p->slot;
    posted_ += p->bytes;
    p->inner->begin = std::move(p->begin);
    inner_->post(std::move(p->inner));
    if (limit > 0 && posted_ >= limit && !dropped_.exchange(true)) {
      // Cut the connections under the transfer in flight, as a failing NIC or cable would.
      inner_->close();
      sink_.on_link_failed(peer_, Error(ErrorCode::kTransport,
                                        "fault injection: data link dropped after " +
                                            std::to_string(posted_) + " bytes (transfer " +
                                            std::to_string(slot) + ")"));
    }
  }

  void delay_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!closed_) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto due = queue_.front().first;
      if (cv_.wait_until(lock, due) != std::cv_status::timeout && !closed_) continue;
      if (closed_) break;
      auto p = std::move(queue_.front().second);
      queue_.pop_front();
      lock.unlock();
      deliver(std::move(p));
      lock.lock();
    }
  }

  FaultInjector& owner_;
  TransportSink& sink_;
  uint64_t peer_;
  std::unique_ptr<DataLink> inner_;
  std::mt19937_64 rng_;
  std::atomic<uint64_t> posted_{0};
  std::atomic<bool> dropped_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, std::unique_ptr<FaultPrepared>>> queue_;
  bool closed_ = false;
  ThreadSet threads_;
};

double parse_number(const std::string& key, const std::string& value) {
  try {
    size_t used = 0;
    double v = std::stod(value, &used);
    if (used != value.size() || v < 0) throw std::invalid_argument("");
    return v;
  } catch (const std::exception&) {
    fail(ErrorCode::kInvalidRequest, "fault spec: '" + key + "=" + value +
                                         "' needs a non-negative number");
  }
}

}  // namespace

FaultSpec parse_fault_spec(const std::string& spec) {
  FaultSpec out;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    std::string key = item.substr(0, eq);
    std::string value = eq == std::string::npos ? "1" : item.substr(eq + 1);
    double v = parse_number(key, value);
    if (key == "reorder") {
      out.reorder = v != 0;
    } else if (key == "delay_ms") {
      out.delay_ms = v;
    } else if (key == "arrival_delay_ms") {
      out.arrival_delay_ms = v;
    } else if (key == "drop_after_bytes") {
      out.drop_after_bytes = static_cast<uint64_t>(v);
    } else if (key == "corrupt_key") {
      out.corrupt_key = v != 0;
    } else if (key == "seed") {
      out.seed = static_cast<uint64_t>(v);
    } else {
      fail(ErrorCode::kInvalidRequest,
           "fault spec: unknown key '" + key +
               "' (known: reorder, delay_ms, arrival_delay_ms, drop_after_bytes, corrupt_key, seed)");
    }
  }
  return out;
}

std::unique_ptr<DataLink> FaultInjector::connect(uint64_t peer, const std::string& remote_address,
                                                 uint64_t token) {
  return std::make_unique<FaultLink>(*this, upstream_, peer, inner_->connect(peer, remote_address, token));
}

void FaultInjector::on_arrival(uint64_t peer, uint64_t slot, uint32_t units) {
  if (spec_.arrival_delay_ms > 0) {
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(spec_.arrival_delay_ms));
  }
  upstream_.on_arrival(peer, slot, units);
}

}  // namespace kvt::fault
