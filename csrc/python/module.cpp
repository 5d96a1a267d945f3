// kvtransfer._core: the binding edge. Each subsystem registers itself; no logic lives here.
#include <pybind11/pybind11.h>

#include "python/bindings.h"
#include "transport/builtin_transports.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "kvtransfer C++ core (private; use the kvtransfer package)";
  kvt::register_builtin_transports();
  kvt::py_bind::register_errors(m);
  kvt::py_bind::register_wire(m);
  kvt::py_bind::register_endpoint(m);
  kvt::py_bind::register_plan(m);
  kvt::py_bind::register_ticket(m);
  kvt::py_bind::register_limits(m);
}
