// What this machine can do with nothing of ours in the way, measured beside the benchmarks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "net/loopback_floor.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace kvt::py_bind {

void register_limits(py::module_& m) {
  m.def("tcp_oneway_seconds", &net::tcp_oneway_seconds, py::arg("nbytes"), py::arg("reps"),
        py::arg("gap_us"), py::arg("busy"), py::call_guard<py::gil_scoped_release>(),
        "One-way times (s) of `reps` messages of `nbytes` between two threads over loopback "
        "TCP, bare sockets: the kernel's floor for the latency rows. The sender waits gap_us "
        "before each (asleep, or spinning when busy).");
}

}  // namespace kvt::py_bind
