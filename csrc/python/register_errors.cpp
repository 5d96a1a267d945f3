// Maps kvt::Error to the Python hierarchy in kvtransfer/errors.py (looked up when an error is
// raised, so importing _core does not import the package).
#include <pybind11/pybind11.h>

#include "core/error.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace kvt::py_bind {

const char* error_class_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidRequest: return "InvalidRequestError";
    case ErrorCode::kTransport: return "TransportError";
    case ErrorCode::kTimeout: return "TimeoutError";
    case ErrorCode::kAuthentication: return "AuthenticationError";
    case ErrorCode::kProtocol: return "ProtocolError";
  }
  return "KVTransferError";
}

void set_python_error(const Error& e) {
  py::object cls = py::module_::import("kvtransfer.errors").attr(error_class_name(e.code()));
  PyErr_SetString(cls.ptr(), e.what());
}

void register_errors(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      set_python_error(e);
    }
  });
  m.def("error_class_name", [](int code) { return error_class_name(static_cast<ErrorCode>(code)); });
}

}  // namespace kvt::py_bind
