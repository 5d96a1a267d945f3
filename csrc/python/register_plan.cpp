// plan/: PlaneSet (one side's geometry, validated once) and plan_segments (block tables ->
// int64 [N, 3] segments plus int64 [G, 4] groups (src_buffer, dst_buffer, begin, end)).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "plan/plane_set.h"
#include "plan/segment_planner.h"
#include "python/bindings.h"

namespace py = pybind11;

namespace kvt::py_bind {
namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<int64_t> to_vector(const Int64Array& a) {
  return std::vector<int64_t>(a.data(), a.data() + a.size());
}

void one_dim(const Int64Array& a, const char* name) {
  if (a.ndim() != 1) {
    fail(ErrorCode::kInvalidRequest, std::string(name) + " must be a 1-D sequence of block ids, got " +
                                         std::to_string(a.ndim()) + " dimensions");
  }
}

// Hands a vector's storage to numpy without copying; the capsule frees it with the array.
template <typename T>
py::array_t<int64_t> rows_array(std::vector<T>&& v, py::ssize_t cols) {
  auto* owner = new std::vector<T>(std::move(v));
  py::capsule free_owner(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const py::ssize_t n = static_cast<py::ssize_t>(owner->size());
  return py::array_t<int64_t>({n, cols}, {cols * static_cast<py::ssize_t>(sizeof(int64_t)),
                                          static_cast<py::ssize_t>(sizeof(int64_t))},
                              reinterpret_cast<const int64_t*>(owner->data()), free_owner);
}

}  // namespace

void register_plan(py::module_& m) {
  static_assert(sizeof(plan::PlanGroup) == 4 * sizeof(int64_t), "PlanGroup maps onto int64 [G, 4]");

  py::class_<plan::PlaneSet, std::shared_ptr<plan::PlaneSet>>(
      m, "PlaneSet", "One side's KV-cache geometry: per plane (layer, K/V part) a buffer and offset.")
      .def(py::init([](int64_t num_blocks, int64_t block_size, int64_t num_heads, int64_t head_bytes,
                       int64_t block_stride, int64_t token_stride, int64_t head_stride,
                       const Int64Array& planes, const Int64Array& buffer_nbytes) {
             if (planes.ndim() != 2 || planes.shape(1) != 2) {
               fail(ErrorCode::kInvalidRequest, "planes must be an int64 array [P, 2] = (buffer, offset)");
             }
             auto s = std::make_shared<plan::PlaneSet>();
             s->num_blocks = num_blocks;
             s->block_size = block_size;
             s->num_heads = num_heads;
             s->head_bytes = head_bytes;
             s->block_stride = block_stride;
             s->token_stride = token_stride;
             s->head_stride = head_stride;
             const int64_t* p = planes.data();
             for (py::ssize_t q = 0; q < planes.shape(0); ++q) {
               s->plane_buffer.push_back(p[2 * q]);
               s->plane_offset.push_back(p[2 * q + 1]);
             }
             s->buffer_nbytes = to_vector(buffer_nbytes);
             s->validate();
             return s;
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("num_heads"), py::arg("head_bytes"),
           py::arg("block_stride"), py::arg("token_stride"), py::arg("head_stride"),
           py::arg("planes"), py::arg("buffer_nbytes"))
      .def_property_readonly("num_planes", [](const plan::PlaneSet& s) { return s.num_planes(); })
      .def_property_readonly("num_blocks", [](const plan::PlaneSet& s) { return s.num_blocks; })
      .def_property_readonly("block_size", [](const plan::PlaneSet& s) { return s.block_size; })
      .def_property_readonly("num_heads", [](const plan::PlaneSet& s) { return s.num_heads; });

  m.def(
      "plan_segments",
      [](const plan::PlaneSet& src, const plan::PlaneSet& dst, const Int64Array& src_blocks,
         const Int64Array& dst_blocks, int64_t plane_begin, int64_t plane_end, int64_t src_head,
         int64_t num_heads, int64_t dst_head, int64_t num_tokens) {
        one_dim(src_blocks, "src_blocks");
        one_dim(dst_blocks, "dst_blocks");
        plan::PlanRequest req;
        req.src_blocks = src_blocks.data();
        req.num_src_blocks = static_cast<size_t>(src_blocks.size());
        req.dst_blocks = dst_blocks.data();
        req.num_dst_blocks = static_cast<size_t>(dst_blocks.size());
        req.plane_begin = plane_begin;
        req.plane_end = plane_end;
        req.src_head = src_head;
        req.num_heads = num_heads;
        req.dst_head = dst_head;
        req.num_tokens = num_tokens;
        plan::Plan plan;
        {
          // Pure computation over arrays this frame keeps alive: other threads may run.
          py::gil_scoped_release release;
          plan = plan::plan_segments(src, dst, req);
        }
        const int64_t nbytes = plan.nbytes;
        return py::make_tuple(rows_array(std::move(plan.segments), 3),
                              rows_array(std::move(plan.groups), 4), nbytes);
      },
      py::arg("src"), py::arg("dst"), py::arg("src_blocks"), py::arg("dst_blocks"),
      py::arg("plane_begin") = 0, py::arg("plane_end") = -1, py::arg("src_head") = 0,
      py::arg("num_heads") = -1, py::arg("dst_head") = 0, py::arg("num_tokens") = -1,
      "Coalesced (src_off, dst_off, len) segments moving the given blocks, planes and heads;\n"
      "returns (segments int64 [N, 3], groups int64 [G, 4] = (src_buffer, dst_buffer, begin, end),\n"
      "nbytes).");
}

}  // namespace kvt::py_bind
