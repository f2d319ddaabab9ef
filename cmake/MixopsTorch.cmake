# Torch is found through the running Python's torch package rather than find_package(Torch):
# torch's CMake config looks for the CUDA toolkit beside the PATH wrapper of nvcc and may link the
# CUDA driver library; mixops must import on machines without a driver, so we name exactly what we
# link: c10, torch, torch_cpu, torch_python (+ c10_cuda, torch_cuda, cudart for CUDA builds).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
    "import torch, os; print(torch.__version__.split('+')[0]); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(int('OpenMP' in torch.__config__.parallel_info())); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _torch_info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "mixops: could not import torch with ${Python_EXECUTABLE}. Install torch "
                      "first (pip install torch==2.14.1) and build with --no-build-isolation.")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 MIXOPS_TORCH_VERSION)
list(GET _torch_info 1 MIXOPS_TORCH_ROOT)
list(GET _torch_info 2 MIXOPS_TORCH_CXX11_ABI)
list(GET _torch_info 3 MIXOPS_TORCH_OPENMP)  # ATen's parallel backend is OpenMP
list(LENGTH _torch_info _n)
set(MIXOPS_TORCH_CUDA "")
if(_n GREATER 4)
  list(GET _torch_info 4 MIXOPS_TORCH_CUDA)
endif()
message(STATUS "mixops: torch ${MIXOPS_TORCH_VERSION} at ${MIXOPS_TORCH_ROOT} (CUDA '${MIXOPS_TORCH_CUDA}')")

function(mixops_link_torch target)
  target_include_directories(${target} SYSTEM PRIVATE
    ${MIXOPS_TORCH_ROOT}/include
    ${MIXOPS_TORCH_ROOT}/include/torch/csrc/api/include)
  target_compile_definitions(${target} PRIVATE
    _GLIBCXX_USE_CXX11_ABI=${MIXOPS_TORCH_CXX11_ABI}
    TORCH_EXTENSION_NAME=_C TORCH_API_INCLUDE_EXTENSION_H)
  target_link_directories(${target} PRIVATE ${MIXOPS_TORCH_ROOT}/lib)
  target_link_libraries(${target} PRIVATE c10 torch torch_cpu torch_python)
  # at::parallel_for is inline: with torch's OpenMP backend its `#pragma omp parallel` is compiled
  # into our object files, and without -fopenmp it silently runs on one thread (router_topk on
  # 4096 x 256 logits: 7.4 ms on 1 or 2 threads alike). libgomp.so.1 resolves to the copy torch
  # has already loaded, so there is one OpenMP runtime in the process.
  if(MIXOPS_TORCH_OPENMP)
    find_package(OpenMP REQUIRED COMPONENTS CXX)
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  endif()
  # Resolve torch's libraries from the installed torch package at run time.
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../torch/lib"
                                             BUILD_WITH_INSTALL_RPATH ON)
endfunction()
