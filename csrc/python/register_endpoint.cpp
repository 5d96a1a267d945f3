// Endpoint, Peer and Transfer. Every call that can block releases the GIL: transfers, waits
// and handshakes run while other Python threads (the serving framework's) keep going.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>

#include "engine/endpoint.h"
#include "python/bindings.h"
#include "transport/transport.h"

namespace py = pybind11;

namespace kvt::py_bind {
namespace {

using Segments = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A transfer's segment table, rows of (src_off, dst_off, len). The latency path is cold after
// idle time and pays for every call it makes, so what callers build (a C-contiguous native int64
// array) is read in place without a call into numpy; anything else is converted once.
class SegmentRows {
 public:
  explicit SegmentRows(py::handle h) {
    static PyObject* const int64_descr = py::dtype::of<int64_t>().release().ptr();
    if (py::isinstance<py::array>(h)) {
      auto a = py::reinterpret_borrow<py::array>(h);
      if (a.dtype().ptr() == int64_descr && (a.flags() & py::array::c_style) &&
          reinterpret_cast<uintptr_t>(a.data()) % alignof(int64_t) == 0) {
        take(a);
        return;
      }
    }
    Segments converted = Segments::ensure(h);
    if (!converted) {
      PyErr_Clear();
      throw py::type_error("segments must be integers, an array of shape [N, 3]");
    }
    if (reinterpret_cast<uintptr_t>(converted.data()) % alignof(int64_t) != 0) {
      Segments aligned(std::vector<py::ssize_t>(converted.shape(), converted.shape() + converted.ndim()));
      std::memcpy(aligned.mutable_data(), converted.data(), static_cast<size_t>(converted.nbytes()));
      converted = std::move(aligned);
    }
    take(converted);
    converted_ = std::move(converted);  // `rows` points into it
  }
  const int64_t* rows = nullptr;
  size_t n = 0;

 private:
  void take(const py::array& a) {
    if (a.ndim() != 2 || a.shape(1) != 3) {
      std::string shape;
      for (py::ssize_t i = 0; i < a.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape(i));
      if (a.ndim() == 1) shape += ",";
      fail(ErrorCode::kInvalidRequest, "segments must have shape [N, 3] (src_off, dst_off, len), got (" +
                                           shape + ")");
    }
    n = static_cast<size_t>(a.shape(0));
    rows = static_cast<const int64_t*>(a.data());
  }
  // Null unless converted. Not a py::array_t: its default constructor makes an empty numpy
  // array, which cost every transfer ~1 us on the bench's cold prefill CPU (timestamps).
  py::object converted_;
};

// The bytes of `h` (bytes, bytearray, memoryview); `what` names the argument when it is not.
std::string bytes_arg(py::handle h, const char* what) {
  if (PyBytes_Check(h.ptr())) {
    return std::string(PyBytes_AS_STRING(h.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(h.ptr())));
  }
  Py_buffer view;
  if (PyObject_GetBuffer(h.ptr(), &view, PyBUF_SIMPLE) != 0) {
    PyErr_Clear();
    fail(ErrorCode::kInvalidRequest,
         std::string(what) + " must be bytes, got " + Py_TYPE(h.ptr())->tp_name);
  }
  std::string out(static_cast<const char*>(view.buf), static_cast<size_t>(view.len));
  PyBuffer_Release(&view);
  return out;
}

// A kvtransfer.Notification (a NamedTuple) made as tuple.__new__(cls, fields) makes it (the
// subclass's tp_alloc, then its items), without running Python or building the two tuples
// that call takes: a notified waiter on a CPU gone cold between requests pays a microsecond
// for those on its way back.
py::object make_notification(const Notification& n) {
  static PyTypeObject* const cls = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("kvtransfer.endpoint").attr("Notification")).release().ptr());
  py::object fields[] = {py::str(n.peer), py::bytes(n.payload),
                         n.failed ? py::object(py::str(n.error)) : py::object(py::none())};
  PyObject* o = cls->tp_alloc(cls, 3);
  if (o == nullptr) throw py::error_already_set();
  for (Py_ssize_t i = 0; i < 3; ++i) PyTuple_SET_ITEM(o, i, fields[i].release().ptr());
  return py::reinterpret_steal<py::object>(o);
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

// The C++ object that a pybind11 instance of `ti`'s class (or of a subclass) holds; null for
// any other object.
template <class T>
T* held(PyObject* o, py::detail::type_info* ti) {
  if (!PyObject_TypeCheck(o, ti->type)) return nullptr;
  return static_cast<T*>(reinterpret_cast<py::detail::instance*>(o)->get_value_and_holder(ti).value_ptr());
}

// A region id: an int (or an object with __index__, as numpy's) in [0, 2**32).
uint32_t region_id_arg(PyObject* o) {
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(o));
  unsigned long v = index ? PyLong_AsUnsignedLong(index.ptr()) : 0;
  if (PyErr_Occurred() || v > UINT32_MAX) {
    PyErr_Clear();
    throw py::type_error("a region id is an integer in [0, 2**32)");
  }
  return static_cast<uint32_t>(v);
}

// Endpoint.transfer(is_write, peer, local, remote, segments, notify, timeout, checksum): every
// write and read starts here. A plain METH_FASTCALL method rather than a pybind11 one: on a
// prefill CPU gone cold since its last request, pybind11's dispatch (overload records, argument
// vectors, casters) cost ~1 us of the ~10 us that a 64 KiB write spends before its sendmsg.
// Wrong types raise TypeError, as pybind11's did; Endpoint.write turns that into a named error.
PyObject* endpoint_transfer(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  static py::detail::type_info* const endpoint_type = py::detail::get_type_info(typeid(Endpoint));
  static py::detail::type_info* const peer_type = py::detail::get_type_info(typeid(PeerConn));
  try {
    if (nargs != 8) {
      throw py::type_error("transfer() takes 8 positional arguments (" + std::to_string(nargs) +
                           " given)");
    }
    Endpoint* ep = held<Endpoint>(self, endpoint_type);
    PeerConn* peer = held<PeerConn>(args[1], peer_type);
    if (ep == nullptr || peer == nullptr) throw py::type_error("transfer() takes an Endpoint and a Peer");
    const int is_write = PyObject_IsTrue(args[0]);
    if (is_write < 0) throw py::error_already_set();
    const uint32_t local = region_id_arg(args[2]), remote = region_id_arg(args[3]);
    const double timeout = PyFloat_AsDouble(args[6]);
    if (timeout == -1.0 && PyErr_Occurred()) throw py::error_already_set();
    const long checksum = PyLong_AsLong(args[7]);
    if (checksum == -1 && PyErr_Occurred()) throw py::error_already_set();
    SegmentRows segs{py::handle(args[4])};
    const bool notify = args[5] != Py_None;
    std::string payload;
    if (notify) payload = bytes_arg(args[5], "notify");
    const std::string* p = notify ? &payload : nullptr;
    const TransferOptions opts{timeout, checksum < 0 ? -1 : checksum != 0};
    std::shared_ptr<TransferState> x;
    {
      py::gil_scoped_release release;
      x = is_write ? ep->write(*peer, local, remote, segs.rows, segs.n, p, opts)
                   : ep->read(*peer, local, remote, segs.rows, segs.n, p, opts);
    }
    return py::cast(std::move(x)).release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const Error& e) {
    set_python_error(e);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef endpoint_transfer_def = {
    "transfer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(endpoint_transfer)),
    METH_FASTCALL,
    // pybind11's docstring form: the signature line is what pybind11-stubgen writes to _core.pyi.
    "transfer(self: kvtransfer._core.Endpoint, is_write: bool, peer: kvtransfer._core.Peer, "
    "local: typing.SupportsInt, remote: typing.SupportsInt, segments: typing.Any, "
    "notify: typing.Any, timeout: typing.SupportsFloat, checksum: typing.SupportsInt, /) -> "
    "kvtransfer._core.Transfer\n\n"
    "Starts a write (is_write) or read of segments, rows of (src_off, dst_off, len), between local "
    "region `local` and the peer's region `remote`; notify: bytes or None; timeout: seconds (0: the "
    "endpoint's); checksum: -1 (the endpoint's), 0 or 1."};

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

  py::class_<Endpoint> endpoint(m, "Endpoint");
  endpoint
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
      .def("wait_notification", [](Endpoint& ep, py::handle payload, double timeout, double spin) {
             if (spin < 0) {
               fail(ErrorCode::kInvalidRequest,
                    "spin must be >= 0 seconds, got " + py::repr(py::float_(spin)).cast<std::string>());
             }
             std::string p = bytes_arg(payload, "payload");
             Notification n;
             {
               py::gil_scoped_release release;
               n = ep.wait_notification(p, timeout, spin);
             }
             return make_notification(n);
           }, py::arg("payload"), py::arg("timeout"), py::arg("spin") = 0.0)
      .def("notifications", [](Endpoint& ep, double timeout) {
        std::vector<Notification> got;
        {
          py::gil_scoped_release release;
          got = ep.notifications(timeout);
        }
        py::list out;
        for (const auto& n : got) out.append(make_notification(n));
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

  py::object transfer = py::reinterpret_steal<py::object>(
      PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(endpoint.ptr()), &endpoint_transfer_def));
  if (!transfer) throw py::error_already_set();
  endpoint.attr("transfer") = transfer;

  m.def("transports", &transport_names, "Transports compiled into this build.");
}

}  // namespace kvt::py_bind
