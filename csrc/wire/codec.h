// Little-endian field codec: the only code that turns integers and byte strings into wire
// bytes and back. A Reader never reads past its end and never trusts a length it was sent:
// every length is checked against what remains and against a caller-given cap.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "core/error.h"

namespace kvt::wire {

// The low `n` bytes of v, little-endian, into a fixed-layout buffer (frame headers, records).
inline void put_le(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint64_t get_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

class Writer {
 public:
  Writer() = default;
  explicit Writer(size_t expected) { out_.reserve(expected); }  // one allocation, not several
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u16(uint16_t v) { put(v, 2); }
  void u32(uint32_t v) { put(v, 4); }
  void u64(uint64_t v) { put(v, 8); }
  void bytes(std::string_view b) {  // u32 length, then the bytes
    u32(static_cast<uint32_t>(b.size()));
    out_.append(b);
  }
  void raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string& str() { return out_; }
  size_t size() const { return out_.size(); }

 private:
  void put(uint64_t v, int n) {
    char le[8];
    for (int i = 0; i < n; ++i) le[i] = static_cast<char>((v >> (8 * i)) & 0xFF);
    out_.append(le, static_cast<size_t>(n));
  }
  std::string out_;
};

class Reader {
 public:
  Reader(const void* data, size_t len, const char* what)
      : p_(static_cast<const uint8_t*>(data)), n_(len), what_(what) {}
  explicit Reader(std::string_view s, const char* what) : Reader(s.data(), s.size(), what) {}

  uint8_t u8() { return static_cast<uint8_t>(get(1)); }
  uint16_t u16() { return static_cast<uint16_t>(get(2)); }
  uint32_t u32() { return static_cast<uint32_t>(get(4)); }
  uint64_t u64() { return get(8); }
  std::string bytes(size_t cap) {
    uint32_t len = u32();
    if (len > cap) {
      fail(ErrorCode::kProtocol, std::string(what_) + ": a field claims " + std::to_string(len) +
                                     " bytes, over the limit of " + std::to_string(cap));
    }
    need(len);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  size_t remaining() const { return n_ - pos_; }
  void expect_end() const {
    if (pos_ != n_) {
      fail(ErrorCode::kProtocol, std::string(what_) + ": " + std::to_string(n_ - pos_) +
                                     " unexpected trailing bytes");
    }
  }

 private:
  void need(size_t k) const {
    if (k > n_ - pos_) {
      fail(ErrorCode::kProtocol, std::string(what_) + ": truncated (needs " + std::to_string(k) +
                                     " more bytes, has " + std::to_string(n_ - pos_) + ")");
    }
  }
  uint64_t get(int k) {
    need(static_cast<size_t>(k));
    uint64_t v = 0;
    for (int i = 0; i < k; ++i) v |= static_cast<uint64_t>(p_[pos_ + i]) << (8 * i);
    pos_ += static_cast<size_t>(k);
    return v;
  }
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const char* what_;
};

}  // namespace kvt::wire
