# Options setup.py passes (all have defaults so a bare `cmake -S . -B build` works too):
#   MIXOPS_CUDA       ON/OFF/AUTO: build the CUDA kernels (AUTO: when torch is a CUDA build and
#                     nvcc is found). setup.py maps the environment variable MIXOPS_CUDA=0|1 here.
#   MIXOPS_ARCH_LIST  "8.0;9.0a" style list (setup.py forwards TORCH_CUDA_ARCH_LIST).
#   CUTLASS_DIR       a CUTLASS checkout or install (its include/ holds cutlass/cutlass.h);
#                     default: the nvidia-cutlass wheel's copy, found through Python.
set(MIXOPS_CUDA "AUTO" CACHE STRING "Build CUDA kernels: ON, OFF or AUTO")
set(MIXOPS_ARCH_LIST "8.0;9.0a" CACHE STRING "CUDA architectures (TORCH_CUDA_ARCH_LIST syntax)")
set(CUTLASS_DIR "" CACHE PATH "CUTLASS root (default: the nvidia-cutlass Python package)")
if(NOT Python_EXECUTABLE)
  set(Python_EXECUTABLE python3)
endif()

find_program(MIXOPS_CCACHE ccache)
if(MIXOPS_CCACHE)
  message(STATUS "mixops: using ccache at ${MIXOPS_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER ${MIXOPS_CCACHE})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${MIXOPS_CCACHE})
endif()
