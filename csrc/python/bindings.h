#pragma once

#include <pybind11/pybind11.h>

#include "core/error.h"

namespace kvt::py_bind {

// Raises `e` as its kvtransfer.errors class (what the registered translator does for bound calls).
void set_python_error(const Error& e);

void register_errors(pybind11::module_& m);
void register_wire(pybind11::module_& m);
void register_endpoint(pybind11::module_& m);
void register_plan(pybind11::module_& m);  // plan/: block tables -> segments
void register_ticket(pybind11::module_& m);
void register_limits(pybind11::module_& m);  // net/loopback_floor: the kernel alone

}  // namespace kvt::py_bind
