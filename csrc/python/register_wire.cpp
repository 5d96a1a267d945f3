#include <pybind11/pybind11.h>

#include "python/bindings.h"
#include "wire/crc32c.h"
#include "wire/version.h"

namespace py = pybind11;

namespace kvt::py_bind {

void register_wire(py::module_& m) {
  m.attr("PROTOCOL_VERSION") = wire::kProtocolVersion;
  m.attr("MAX_NOTIFY_BYTES") = wire::kMaxNotify;
  m.def("crc32c", [](py::bytes data, uint32_t crc) {
    std::string_view v = data;
    return wire::crc32c(v.data(), v.size(), crc);
  }, py::arg("data"), py::arg("crc") = 0, "CRC-32C of data, extending crc.");
}

}  // namespace kvt::py_bind
