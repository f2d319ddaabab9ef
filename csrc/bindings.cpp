// The pybind11 module mixops._C: importing it runs the static TORCH_LIBRARY registrations of every
// op; build_info() reports what this binary was built with. Nothing heavy lives here.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixops compiled operators (registered as torch.ops.mixops.*)";
  m.def("build_info", []() {
    py::dict d;
    d["torch_version"] = std::string(MIXOPS_TORCH_VERSION);
    d["cuda_version"] = std::string(MIXOPS_CUDA_VERSION);
    d["cutlass_version"] = std::string(MIXOPS_CUTLASS_VERSION);
    d["archs"] = std::string(MIXOPS_ARCHS);
    d["with_cuda"] = static_cast<bool>(MIXOPS_WITH_CUDA);
    d["has_sm90"] = static_cast<bool>(MIXOPS_HAS_SM90);
    return d;
  }, "Versions and CUDA archs this extension was compiled with.");
}
