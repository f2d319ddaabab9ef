// The pybind11 module mixops._C: importing it runs the static TORCH_LIBRARY registrations of every
// op; build_info() reports what this binary was built with. Nothing heavy lives here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "core/error_record.h"
#include "grouped_mm/cpu_thin.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixops compiled operators (registered as torch.ops.mixops.*)";
  m.def(
      "build_info",
      []() {
        py::dict d;
        d["torch_version"] = std::string(MIXOPS_TORCH_VERSION);
        d["cuda_version"] = std::string(MIXOPS_CUDA_VERSION);
        d["cutlass_version"] = std::string(MIXOPS_CUTLASS_VERSION);
        d["archs"] = std::string(MIXOPS_ARCHS);
        d["with_cuda"] = static_cast<bool>(MIXOPS_WITH_CUDA);
        d["has_sm90"] = static_cast<bool>(MIXOPS_HAS_SM90);
        return d;
      },
      "Versions and CUDA archs this extension was compiled with.");
  m.def(
      "_cpu_thin_kernel", []() { return std::string(mixops::grouped_mm_thin_isa()); },
      "The SIMD kernel grouped_mm uses for thin groups on this CPU: avx512, avx2 or none.");
  // Test hooks for the host side of device error reporting (core/error_record.h), which CPU-only
  // machines can run: what mixops.check_errors() would raise for these bits on `device`.
  m.def("_record_error_context", [](int device, const std::string& op, int64_t a, int64_t b) {
    for (int s = 0; s < mixops::kNumErrorSlots; ++s) {
      if (op == mixops::error_slot_name(static_cast<mixops::ErrorSlot>(s))) {
        mixops::record_error_context(device, static_cast<mixops::ErrorSlot>(s),
                                     {a, b, "a.size(0)"});
        return;
      }
    }
    throw py::value_error("unknown op " + op);
  });
  m.def("_describe_device_errors", [](int device, const std::vector<int32_t>& bits) {
    if (bits.size() != static_cast<size_t>(mixops::kNumErrorSlots)) {
      throw py::value_error("bits must have one entry per error slot");
    }
    return mixops::describe_device_errors(device, bits.data());
  });
  m.attr("_error_slots") = [] {
    py::list names;
    for (int s = 0; s < mixops::kNumErrorSlots; ++s) {
      names.append(mixops::error_slot_name(static_cast<mixops::ErrorSlot>(s)));
    }
    return names;
  }();
}
