#include "python/bindings.h"

namespace kvt::py_bind {

void register_plan(pybind11::module_&) {}

}  // namespace kvt::py_bind
