// Tickets to and from Python dicts; the bytes are made only by wire/ticket.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "python/bindings.h"
#include "wire/ticket.h"

namespace py = pybind11;

namespace kvt::py_bind {

void register_ticket(py::module_& m) {
  m.def("encode_note", [](const std::string& kind, py::bytes request_id, uint32_t src_rank,
                          uint32_t n_sources, uint32_t layer_begin, uint32_t layer_end,
                          uint32_t group, uint32_t n_groups) {
    wire::KvNote n{kind == "pulled" ? wire::NoteKind::kPulled : wire::NoteKind::kLayers,
                   request_id, src_rank, n_sources, layer_begin, layer_end, group, n_groups};
    return py::bytes(wire::encode_note(n));
  }, py::arg("kind"), py::arg("request_id"), py::arg("src_rank"), py::arg("n_sources"),
     py::arg("layer_begin"), py::arg("layer_end"), py::arg("group"), py::arg("n_groups"));
  m.def("decode_note", [](py::bytes data) -> py::object {
    wire::KvNote n;
    if (!wire::decode_note(data, &n)) return py::none();
    return py::make_tuple(n.kind == wire::NoteKind::kPulled ? "pulled" : "layers",
                          py::bytes(n.request_id), n.src_rank, n.n_sources, n.layer_begin,
                          n.layer_end, n.group, n.n_groups);
  }, py::arg("payload"));
  m.def("note_prefix", [](py::bytes request_id) { return py::bytes(wire::note_prefix(request_id)); },
        py::arg("request_id"));
  m.def("encode_ticket", [](const std::string& kind, py::bytes request_id, py::bytes endpoint_info,
                            uint32_t tp_rank, uint32_t tp_size, py::bytes fingerprint,
                            py::bytes descriptor, std::vector<uint32_t> regions,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> blocks,
                            uint32_t timeout_ms) {
    wire::Ticket t;
    t.kind = kind == "offer" ? wire::TicketKind::kOffer : wire::TicketKind::kExpect;
    t.request_id = request_id;
    t.endpoint_info = endpoint_info;
    t.tp_rank = tp_rank;
    t.tp_size = tp_size;
    t.fingerprint = fingerprint;
    t.descriptor = descriptor;
    t.regions = std::move(regions);
    t.blocks.assign(blocks.data(), blocks.data() + blocks.size());
    t.timeout_ms = timeout_ms;
    return py::bytes(wire::encode_ticket(t));
  }, py::arg("kind"), py::arg("request_id"), py::arg("endpoint_info"), py::arg("tp_rank"),
     py::arg("tp_size"), py::arg("fingerprint"), py::arg("descriptor"), py::arg("regions"),
     py::arg("blocks"), py::arg("timeout_ms"));
  m.def("decode_ticket", [](py::bytes data) {
    wire::Ticket t = wire::decode_ticket(data);
    py::dict d;
    d["kind"] = t.kind == wire::TicketKind::kOffer ? "offer" : "expect";
    d["request_id"] = py::bytes(t.request_id);
    d["endpoint_info"] = py::bytes(t.endpoint_info);
    d["tp_rank"] = t.tp_rank;
    d["tp_size"] = t.tp_size;
    d["fingerprint"] = py::bytes(t.fingerprint);
    d["descriptor"] = py::bytes(t.descriptor);
    d["regions"] = t.regions;
    py::array_t<int64_t> blocks(static_cast<py::ssize_t>(t.blocks.size()));
    std::copy(t.blocks.begin(), t.blocks.end(), blocks.mutable_data());
    d["blocks"] = blocks;
    d["timeout_ms"] = t.timeout_ms;
    return d;
  }, py::arg("ticket"));
}

}  // namespace kvt::py_bind
