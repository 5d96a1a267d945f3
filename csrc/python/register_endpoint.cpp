// Endpoint, Peer and Transfer. Every call that can block releases the GIL: transfers, waits
// and handshakes run while other Python threads (the serving framework's) keep going.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "engine/endpoint.h"
#include "python/bindings.h"
#include "transport/transport.h"

namespace py = pybind11;

namespace kvt::py_bind {
namespace {

using Segments = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

const int64_t* segment_rows(const Segments& segs, size_t* n) {
  if (segs.ndim() != 2 || segs.shape(1) != 3) {
    std::string shape;
    for (py::ssize_t i = 0; i < segs.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(segs.shape(i));
    if (segs.ndim() == 1) shape += ",";
    fail(ErrorCode::kInvalidRequest, "segments must have shape [N, 3] (src_off, dst_off, len), got (" +
                                         shape + ")");
  }
  *n = static_cast<size_t>(segs.shape(0));
  return segs.data();
}

py::dict stats_dict(const StatsSnapshot& s) {
  py::dict d;
  d["bytes_written"] = s.bytes_written;
  d["bytes_read"] = s.bytes_read;
  d["transfers_done"] = s.transfers_done;
  d["transfers_failed"] = s.transfers_failed;
  d["inbound_done"] = s.inbound_done;
  d["inbound_failed"] = s.inbound_failed;
  d["errors"] = s.errors;
  d["peers"] = s.peers;
  d["spin_reads"] = s.spin_reads;
  d["sleep_reads"] = s.sleep_reads;
  d["latency_p50_s"] = s.latency_p50_s;
  d["latency_p99_s"] = s.latency_p99_s;
  d["latency_samples"] = s.latency_samples;
  return d;
}

py::tuple notification_tuple(const Notification& n) {
  return py::make_tuple(n.peer, py::bytes(n.payload),
                        n.failed ? py::object(py::str(n.error)) : py::object(py::none()));
}

}  // namespace

void register_endpoint(py::module_& m) {
  py::class_<TransferState, std::shared_ptr<TransferState>>(m, "Transfer")
      .def("wait", &TransferState::wait, py::arg("timeout"), py::call_guard<py::gil_scoped_release>(),
           "Blocks until the transfer ends or timeout (s, negative: none); True if it ended.")
      .def_property_readonly("status", [](const TransferState& x) { return static_cast<int>(x.status()); })
      .def_property_readonly("code", [](const TransferState& x) { return static_cast<int>(x.code()); })
      .def_property_readonly("error", &TransferState::error)
      .def_property_readonly("nbytes", [](const TransferState& x) { return x.bytes; })
      .def_property_readonly("latency_s", &TransferState::latency_s)
      .def_property_readonly("id", [](const TransferState& x) { return x.slot; });

  py::class_<PeerConn, std::shared_ptr<PeerConn>>(m, "Peer")
      .def_property_readonly("name", [](const PeerConn& p) { return p.name; })
      .def_property_readonly("address", [](const PeerConn& p) { return p.address; })
      .def_property_readonly("alive", [](const PeerConn& p) { return !p.dead.load(); });

  py::class_<Endpoint>(m, "Endpoint")
      .def(py::init([](std::string name, std::string transport, std::string listen,
                       std::string auth_token, double timeout, int connections, std::string provider,
                       bool checksum, std::string faults) {
             EndpointOptions o;
             o.name = std::move(name);
             o.transport = std::move(transport);
             o.listen = std::move(listen);
             o.auth_token = std::move(auth_token);
             o.timeout_s = timeout;
             o.connections = connections;
             o.provider = std::move(provider);
             o.checksum = checksum;
             o.faults = std::move(faults);
             return std::make_unique<Endpoint>(std::move(o));
           }),
           py::arg("name"), py::arg("transport"), py::arg("listen"), py::arg("auth_token"),
           py::arg("timeout"), py::arg("connections"), py::arg("provider"), py::arg("checksum"),
           py::arg("faults") = "",
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("address", &Endpoint::address)
      .def_property_readonly("name", &Endpoint::name)
      .def("caps", [](const Endpoint& ep) {
        TransportCaps c = ep.caps();
        py::dict d;
        d["name"] = c.name;
        d["rdma_read"] = c.rdma_read;
        d["ordered"] = c.ordered;
        d["software_key_check"] = c.software_key_check;
        d["max_segment"] = c.max_segment;
        return d;
      })
      .def("info", [](const Endpoint& ep) { return py::bytes(ep.info()); })
      .def("register", [](Endpoint& ep, uintptr_t addr, uint64_t nbytes, bool rw, bool rr) {
             py::gil_scoped_release release;
             return ep.register_region(addr, nbytes, rw, rr)->id;
           }, py::arg("addr"), py::arg("nbytes"), py::arg("remote_write"), py::arg("remote_read"))
      .def("deregister", &Endpoint::deregister_region, py::arg("id"), py::arg("timeout"),
           py::call_guard<py::gil_scoped_release>())
      .def("connect", [](Endpoint& ep, py::bytes target, double timeout) {
             std::string t = target;
             py::gil_scoped_release release;
             return ep.connect(t, timeout);
           }, py::arg("target"), py::arg("timeout"))
      .def("disconnect", &Endpoint::disconnect, py::arg("peer"),
           py::call_guard<py::gil_scoped_release>())
      .def("cancel", &Endpoint::cancel, py::arg("transfer"),
           py::call_guard<py::gil_scoped_release>())
      .def("peer_regions", &Endpoint::peer_regions, py::arg("peer"), py::arg("timeout"),
           py::call_guard<py::gil_scoped_release>())
      .def("transfer", [](Endpoint& ep, bool is_write, PeerConn& peer, uint32_t local,
                          uint32_t remote, const Segments& segs, std::optional<py::bytes> notify,
                          double timeout, int checksum) {
             size_t n = 0;
             const int64_t* rows = segment_rows(segs, &n);
             std::optional<std::string> payload;
             if (notify) payload = std::string(*notify);
             const std::string* p = payload ? &*payload : nullptr;
             TransferOptions opts{timeout, checksum};
             py::gil_scoped_release release;
             return is_write ? ep.write(peer, local, remote, rows, n, p, opts)
                             : ep.read(peer, local, remote, rows, n, p, opts);
           }, py::arg("is_write"), py::arg("peer"), py::arg("local"), py::arg("remote"),
           py::arg("segments"), py::arg("notify"), py::arg("timeout"), py::arg("checksum"))
      .def("wait_notification", [](Endpoint& ep, py::bytes payload, double timeout, double spin) {
             std::string p = payload;
             Notification n;
             {
               py::gil_scoped_release release;
               n = ep.wait_notification(p, timeout, spin);
             }
             return notification_tuple(n);
           }, py::arg("payload"), py::arg("timeout"), py::arg("spin") = 0.0)
      .def("notifications", [](Endpoint& ep, double timeout) {
        std::vector<Notification> got;
        {
          py::gil_scoped_release release;
          got = ep.notifications(timeout);
        }
        py::list out;
        for (const auto& n : got) out.append(notification_tuple(n));
        return out;
      }, py::arg("timeout") = 0.0)
      .def("refuse_inbound", [](Endpoint& ep, py::bytes prefix, const std::string& reason) {
        std::string p = prefix;
        py::gil_scoped_release release;
        ep.refuse_inbound(p, reason);
      }, py::arg("prefix"), py::arg("reason"))
      .def("errors", [](const Endpoint& ep) {
        py::list out;
        for (const auto& e : ep.errors()) out.append(py::make_tuple(static_cast<int>(e.code()), e.what()));
        return out;
      })
      .def("stats", [](const Endpoint& ep) { return stats_dict(ep.stats()); })
      .def("close", &Endpoint::close, py::call_guard<py::gil_scoped_release>());

  m.def("transports", &transport_names, "Transports compiled into this build.");
}

}  // namespace kvt::py_bind
