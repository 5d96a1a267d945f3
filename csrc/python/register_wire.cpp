// wire/ and serialize/ at the binding edge: crc32c, the protocol constants, and thin encode /
// decode helpers so Python (tests, tools, kvtransfer.serialize) goes through the one C++ codec.
// Decoder errors are kvt::Error and reach Python as ProtocolError / InvalidRequestError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "python/bindings.h"
#include "serialize/kv_file.h"
#include "wire/control.h"
#include "wire/crc32c.h"
#include "wire/data_frame.h"
#include "wire/version.h"

namespace py = pybind11;

namespace kvt::py_bind {
namespace {

// A contiguous view of any buffer-protocol object (bytes, bytearray, memoryview, numpy array).
class Bytes {
 public:
  Bytes(const py::handle& obj, bool writable) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE | (writable ? PyBUF_WRITABLE : 0)) != 0) {
      PyErr_Clear();
      fail(ErrorCode::kInvalidRequest,
           std::string("expected a contiguous") + (writable ? " writable" : "") +
               " bytes-like object, got " + std::string(Py_TYPE(obj.ptr())->tp_name));
    }
  }
  ~Bytes() { PyBuffer_Release(&view_); }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }
  std::string str() const { return std::string(reinterpret_cast<const char*>(data()), size()); }

 private:
  Py_buffer view_{};
};

constexpr size_t kReleaseGilAbove = 64 * 1024;

py::dict regions_dict(const std::vector<RemoteRegion>& regions) {
  py::dict out;
  for (const auto& r : regions) {
    py::dict d;
    d["key"] = r.key;
    d["nbytes"] = r.nbytes;
    d["base"] = r.base;
    d["remote_write"] = r.remote_write;
    d["remote_read"] = r.remote_read;
    d["rkey"] = py::bytes(r.rkey);
    out[py::int_(r.id)] = d;
  }
  return out;
}

py::dict decode_message(uint16_t type, const std::string& body) {
  using wire::MsgType;
  py::dict d;
  switch (static_cast<MsgType>(type)) {
    case MsgType::kHello: {
      auto m = wire::decode_hello(body);
      d["version"] = m.version;
      d["name"] = py::bytes(m.name);
      d["nonce"] = py::bytes(m.nonce);
      break;
    }
    case MsgType::kChallenge: {
      auto m = wire::decode_challenge(body);
      d["version"] = m.version;
      d["name"] = py::bytes(m.name);
      d["nonce"] = py::bytes(m.nonce);
      d["auth_required"] = m.auth_required;
      d["proof"] = py::bytes(m.proof);
      break;
    }
    case MsgType::kAuth:
      d["proof"] = py::bytes(wire::decode_bytes(body, 64));
      break;
    case MsgType::kWelcome: {
      auto m = wire::decode_welcome(body);
      d["token"] = m.token;
      d["transport"] = py::bytes(m.transport);
      d["address"] = py::bytes(m.address);
      d["regions"] = regions_dict(m.regions);
      break;
    }
    case MsgType::kError: {
      auto m = wire::decode_error(body);
      d["code"] = m.code;
      d["message"] = py::bytes(m.message);
      break;
    }
    case MsgType::kBegin: {
      auto m = wire::decode_begin(body);
      d["slot"] = m.slot;
      d["units"] = m.units;
      d["deadline_ms"] = m.deadline_ms;
      d["has_notify"] = m.has_notify;
      d["notify"] = py::bytes(m.notify);
      break;
    }
    case MsgType::kAck: {
      auto m = wire::decode_ack(body);
      d["slot"] = m.slot;
      d["code"] = m.code;
      d["message"] = py::bytes(m.message);
      break;
    }
    case MsgType::kAbort:
    case MsgType::kNotify: {
      auto [slot, b] = wire::decode_slot_bytes(
          body, static_cast<MsgType>(type) == MsgType::kAbort ? 4096 : wire::kMaxNotify);
      d["slot"] = slot;
      d[static_cast<MsgType>(type) == MsgType::kAbort ? "reason" : "payload"] = py::bytes(b);
      break;
    }
    case MsgType::kRegionsReq:
      break;
    case MsgType::kRegions:
      d["regions"] = regions_dict(wire::decode_regions(body));
      break;
    default:
      fail(ErrorCode::kProtocol, "control message of unknown type " + std::to_string(type));
  }
  return d;
}

py::dict kv_header_dict(const serialize::KvFileHeader& h, size_t header_bytes) {
  py::dict d;
  d["version"] = h.version;
  d["flags"] = h.flags;
  d["dtype"] = py::bytes(h.dtype);  // bytes: a crafted file need not hold valid UTF-8
  d["itemsize"] = h.itemsize;
  d["num_layers"] = h.num_layers;
  d["kv_parts"] = h.kv_parts;
  d["block_size"] = h.block_size;
  d["num_kv_heads"] = h.num_kv_heads;
  d["head_dim"] = h.head_dim;
  d["block_bytes"] = h.block_bytes;
  d["num_blocks"] = h.num_blocks;
  d["scale_count"] = h.scale_count;
  d["fingerprint"] = py::bytes(h.fingerprint);
  d["layout"] = py::bytes(h.layout);
  d["header_bytes"] = header_bytes;  // as sent: may include fields this build skips
  d["record_bytes"] = serialize::kv_record_bytes(h);
  return d;
}

// Runs the codec in a loop without Python in it: what one frame costs the C++ side.
double wire_bench(const std::string& kind, uint64_t n) {
  using Clock = std::chrono::steady_clock;
  py::gil_scoped_release nogil;
  volatile uint64_t sink = 0;
  auto t0 = Clock::now();
  if (kind == "control_encode" || kind == "control_decode") {
    std::string body = wire::encode(wire::Begin{42, 8, 5000, true, std::string(16, 'r')});
    std::string frame = wire::encode_control(wire::MsgType::kBegin, body);
    for (uint64_t i = 0; i < n; ++i) {
      if (kind == "control_encode") {
        wire::Begin b{i, 8, 5000, true, std::string(16, 'r')};
        sink = sink + wire::encode_control(wire::MsgType::kBegin, wire::encode(b)).size();
      } else {
        auto h = wire::decode_control_header(reinterpret_cast<const uint8_t*>(frame.data()));
        std::string b(frame, wire::kControlHeaderSize, h.length);
        wire::verify_control_body(h, b);
        sink = sink + wire::decode_begin(b).slot;
      }
    }
  } else if (kind == "data_encode" || kind == "data_decode") {
    std::vector<wire::DataDesc> descs(8);
    for (size_t i = 0; i < descs.size(); ++i) descs[i] = {i * 65536, 32768};
    wire::DataHeader h;
    h.nseg = 8;
    h.slot = 7;
    h.payload = 8 * 32768;
    uint8_t raw[wire::kDataHeaderSize + 8 * wire::kDataDescSize];
    wire::encode_data_header(h, descs.data(), raw);
    wire::encode_descs(descs.data(), 8, raw + wire::kDataHeaderSize);
    std::vector<wire::DataDesc> out(8);
    for (uint64_t i = 0; i < n; ++i) {
      if (kind == "data_encode") {
        h.slot = i;
        wire::encode_data_header(h, descs.data(), raw);
        wire::encode_descs(descs.data(), 8, raw + wire::kDataHeaderSize);
        sink = sink + raw[20];
      } else {
        auto d = wire::decode_data_header(raw);
        wire::decode_descs(raw + wire::kDataHeaderSize, d.nseg, out.data());
        wire::verify_data_crc(raw, out.data(), d.nseg);
        sink = sink + out[7].off;
      }
    }
  } else {
    fail(ErrorCode::kInvalidRequest, "unknown benchmark '" + kind + "'");
  }
  (void)sink;
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

void register_wire(py::module_& m) {
  m.attr("PROTOCOL_VERSION") = wire::kProtocolVersion;
  m.attr("MAX_NOTIFY_BYTES") = wire::kMaxNotify;
  m.attr("KV_FILE_VERSION") = serialize::kKvFileVersion;

  m.def("crc32c", [](const py::object& data, uint32_t crc) {
    Bytes b(data, false);
    if (b.size() < kReleaseGilAbove) return wire::crc32c(b.data(), b.size(), crc);
    py::gil_scoped_release nogil;  // large payloads: let other threads run meanwhile
    return wire::crc32c(b.data(), b.size(), crc);
  }, py::arg("data"), py::arg("crc") = 0,
        "CRC-32C of a bytes-like object, extending crc (hardware-accelerated where available).");

  // ---- control frames
  m.def("encode_control", [](uint16_t type, const py::object& body) {
    if (type < 1 || type > static_cast<uint16_t>(wire::MsgType::kRegions)) {
      fail(ErrorCode::kInvalidRequest, "unknown control message type " + std::to_string(type));
    }
    return py::bytes(wire::encode_control(static_cast<wire::MsgType>(type), Bytes(body, false).str()));
  }, py::arg("type"), py::arg("body"), "A control frame (16-byte header + body).");
  m.def("decode_control", [](const py::object& frame) {
    Bytes f(frame, false);
    if (f.size() < wire::kControlHeaderSize) {
      fail(ErrorCode::kProtocol, "control frame header: truncated (" + std::to_string(f.size()) +
                                     " of 16 bytes)");
    }
    wire::ControlHeader h = wire::decode_control_header(f.data());
    size_t have = f.size() - wire::kControlHeaderSize;
    if (have != h.length) {
      fail(ErrorCode::kProtocol, "control frame announces a " + std::to_string(h.length) +
                                     "-byte body but " + std::to_string(have) + " bytes follow");
    }
    std::string body(reinterpret_cast<const char*>(f.data()) + wire::kControlHeaderSize, have);
    wire::verify_control_body(h, body);
    return py::make_tuple(static_cast<int>(h.type), h.version, py::bytes(body));
  }, py::arg("frame"), "(type, version, body) of one whole control frame; checks its crc32c.");
  m.def("decode_message", [](uint16_t type, const py::object& body) {
    return decode_message(type, Bytes(body, false).str());
  }, py::arg("type"), py::arg("body"), "The fields of a control message body, as a dict.");

  // ---- endpoint info
  m.def("encode_info", [](const std::string& name, const std::string& address,
                          const std::string& transport,
                          const std::vector<std::pair<uint32_t, uint64_t>>& regions) {
    return py::bytes(wire::encode_info(wire::EndpointInfo{name, address, transport, regions}));
  }, py::arg("name"), py::arg("address"), py::arg("transport"), py::arg("regions"));
  m.def("decode_info", [](const py::object& blob) {
    wire::EndpointInfo info = wire::decode_info(Bytes(blob, false).str());
    py::dict d;
    d["name"] = py::bytes(info.name);
    d["address"] = py::bytes(info.address);
    d["transport"] = py::bytes(info.transport);
    d["regions"] = info.regions;
    return d;
  }, py::arg("blob"), "The fields of an endpoint info blob (ep.info()).");

  // ---- data frames
  m.def("encode_data_frame", [](uint8_t type, uint64_t slot, uint32_t region, uint64_t key,
                                uint32_t frame, uint64_t payload, uint8_t flags,
                                const std::vector<std::pair<uint64_t, uint64_t>>& descs) {
    if (type < 1 || type > 5) fail(ErrorCode::kInvalidRequest, "unknown data frame type");
    if (descs.size() > wire::kMaxDescsPerFrame) {
      fail(ErrorCode::kInvalidRequest, "too many descriptors for one frame");
    }
    std::vector<wire::DataDesc> d;
    for (const auto& [off, len] : descs) d.push_back({off, len});
    wire::DataHeader h;
    h.type = static_cast<wire::DataType>(type);
    h.flags = flags;
    h.nseg = static_cast<uint32_t>(d.size());
    h.region = region;
    h.frame = frame;
    h.slot = slot;
    h.key = key;
    h.payload = payload;
    std::string out(wire::kDataHeaderSize + d.size() * wire::kDataDescSize, '\0');
    auto* p = reinterpret_cast<uint8_t*>(out.data());
    wire::encode_data_header(h, d.data(), p);
    wire::encode_descs(d.data(), h.nseg, p + wire::kDataHeaderSize);
    return py::bytes(out);
  }, py::arg("type"), py::arg("slot"), py::arg("region") = 0, py::arg("key") = 0,
        py::arg("frame") = 0, py::arg("payload") = 0, py::arg("flags") = 0,
        py::arg("descs") = std::vector<std::pair<uint64_t, uint64_t>>{},
        "A data frame's header and descriptors (the payload is not included).");
  m.def("decode_data_frame", [](const py::object& raw) {
    Bytes b(raw, false);
    if (b.size() < wire::kDataHeaderSize) {
      fail(ErrorCode::kProtocol, "data frame header: truncated (" + std::to_string(b.size()) +
                                     " of 48 bytes)");
    }
    wire::DataHeader h = wire::decode_data_header(b.data());
    size_t want = wire::kDataHeaderSize + static_cast<size_t>(h.nseg) * wire::kDataDescSize;
    if (b.size() != want) {
      fail(ErrorCode::kProtocol, "data frame announces " + std::to_string(h.nseg) +
                                     " descriptors (" + std::to_string(want) + " bytes) but has " +
                                     std::to_string(b.size()) + " bytes");
    }
    std::vector<wire::DataDesc> descs(h.nseg);
    wire::decode_descs(b.data() + wire::kDataHeaderSize, h.nseg, descs.data());
    wire::verify_data_crc(b.data(), descs.data(), h.nseg);
    py::dict d;
    d["type"] = static_cast<int>(h.type);
    d["flags"] = h.flags;
    d["region"] = h.region;
    d["frame"] = h.frame;
    d["slot"] = h.slot;
    d["key"] = h.key;
    d["payload"] = h.payload;
    py::list l;
    for (const auto& x : descs) l.append(py::make_tuple(x.off, x.len));
    d["descs"] = l;
    return d;
  }, py::arg("raw"), "Header fields and descriptors of a data frame (header + descriptors); "
                     "checks its crc32c.");

  m.def("_wire_bench", &wire_bench, py::arg("kind"), py::arg("n"),
        "Seconds to run n encodes or decodes of a typical frame in C++ (benchmarks only).");

  // ---- KV offload file (kvtransfer.serialize)
  m.attr("KV_PREAMBLE_BYTES") = serialize::kKvPreambleSize;
  m.attr("KV_RECORD_HEADER_BYTES") = serialize::kKvRecordHeaderSize;
  m.attr("KV_RECORD_TRAILER_BYTES") = serialize::kKvRecordTrailerSize;
  m.def("encode_kv_header", [](const py::dict& d) {
    serialize::KvFileHeader h;
    h.flags = d["flags"].cast<uint16_t>();
    h.dtype = d["dtype"].cast<std::string>();
    h.itemsize = d["itemsize"].cast<uint32_t>();
    h.num_layers = d["num_layers"].cast<uint32_t>();
    h.kv_parts = d["kv_parts"].cast<uint32_t>();
    h.block_size = d["block_size"].cast<uint32_t>();
    h.num_kv_heads = d["num_kv_heads"].cast<uint32_t>();
    h.head_dim = d["head_dim"].cast<uint32_t>();
    h.block_bytes = d["block_bytes"].cast<uint64_t>();
    h.num_blocks = d["num_blocks"].cast<uint64_t>();
    h.scale_count = d["scale_count"].cast<uint32_t>();
    h.fingerprint = d["fingerprint"].cast<std::string>();
    h.layout = d["layout"].cast<std::string>();
    std::string out = serialize::encode_kv_header(h);
    serialize::decode_kv_header(reinterpret_cast<const uint8_t*>(out.data()), out.size());
    return py::bytes(out);
  }, py::arg("header"), "A KV file header from its fields (checked as a reader would).");
  m.def("kv_header_length", [](const py::object& preamble) {
    Bytes b(preamble, false);
    if (b.size() < serialize::kKvPreambleSize) {
      fail(ErrorCode::kProtocol, "KV file header: truncated (" + std::to_string(b.size()) +
                                     " of 12 bytes)");
    }
    return serialize::kv_header_length(b.data());
  }, py::arg("preamble"), "Total header bytes announced by a KV file's first 12 bytes.");
  m.def("decode_kv_header", [](const py::object& raw) {
    Bytes b(raw, false);
    auto h = serialize::decode_kv_header(b.data(), b.size());
    return kv_header_dict(h, serialize::kv_header_length(b.data()));
  }, py::arg("raw"), "The fields of a KV file header (checked: crc, caps, geometry).");
  m.def("seal_kv_record", [](const py::object& rec, uint32_t seq, uint64_t source_block) {
    Bytes b(rec, true);
    py::gil_scoped_release nogil;  // a crc over a whole block
    serialize::seal_kv_record(b.data(), b.size(), seq, source_block);
  }, py::arg("record"), py::arg("seq"), py::arg("source_block"),
        "Writes a KV record's header and crc32c into a buffer holding its scales and data.");
  m.def("open_kv_record", [](const py::object& rec, uint32_t seq) {
    Bytes b(rec, false);
    py::gil_scoped_release nogil;
    return serialize::open_kv_record(b.data(), b.size(), seq);
  }, py::arg("record"), py::arg("seq"),
        "Checks a KV record (magic, sequence, crc32c); returns its source block id.");
}

}  // namespace kvt::py_bind
