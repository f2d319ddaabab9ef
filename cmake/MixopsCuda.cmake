# CUDA side of the build: decide whether to build kernels, find the toolkit and CUTLASS, and give
# every .cu file its own architecture flags by name (the rules are in cmake/MixopsArchs.cmake):
#   *_sm90.cu  -> sm_90a only (wgmma/TMA kernels; compiled only when 9.0a is in MIXOPS_ARCH_LIST)
#   *_sm80.cu  -> listed archs >= 8.0, PTX never below compute_80 (CUTLASS 2 kernels)
#   other .cu  -> every listed arch, plus PTX for the lowest one
# Sources: csrc/<family>/*.cu and csrc/<family>/cuda.cpp (the CUDA op layers).
# ptxas -v output of every CUDA translation unit is kept in ${MIXOPS_PTXAS_DIR} (tests read it).
set(MIXOPS_WITH_CUDA OFF)
set(MIXOPS_HAS_SM90 OFF)
set(MIXOPS_CUDA_VERSION "")
set(MIXOPS_CUTLASS_VERSION "")
set(MIXOPS_ARCHS_BUILT "")

string(TOUPPER "${MIXOPS_CUDA}" _want)
if(_want STREQUAL "AUTO")
  if(MIXOPS_TORCH_CUDA AND CMAKE_CUDA_COMPILER)
    set(_want ON)
  else()
    set(_want OFF)
  endif()
endif()
if(_want AND NOT MIXOPS_TORCH_CUDA)
  message(FATAL_ERROR "mixops: MIXOPS_CUDA=1 but torch ${MIXOPS_TORCH_VERSION} is a CPU-only build")
endif()

if(_want)
  set(MIXOPS_WITH_CUDA ON)
  set(CMAKE_CUDA_ARCHITECTURES OFF)  # per-source -gencode flags below instead
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(MIXOPS_CUDA_VERSION "${CUDAToolkit_VERSION}")

  # ---- CUTLASS: CUTLASS_DIR, else the nvidia-cutlass wheel ----
  if(NOT CUTLASS_DIR)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c
        "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
      OUTPUT_VARIABLE CUTLASS_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  if(NOT CUTLASS_DIR OR NOT EXISTS "${CUTLASS_DIR}/include/cutlass/cutlass.h")
    message(FATAL_ERROR
      "mixops: CUTLASS headers not found (looked in '${CUTLASS_DIR}'). Install them with "
      "`pip install nvidia-cutlass==4.2.0.0`, or set CUTLASS_DIR to a CUTLASS checkout, or build "
      "without CUDA kernels with MIXOPS_CUDA=0.")
  endif()
  file(STRINGS "${CUTLASS_DIR}/include/cutlass/version.h" _v REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*CUTLASS_PATCH ([0-9]+).*"
         "\\1.\\2.\\3" MIXOPS_CUTLASS_VERSION "${_v}")
  message(STATUS "mixops: CUTLASS ${MIXOPS_CUTLASS_VERSION} at ${CUTLASS_DIR}")

  # ---- architectures (cmake/MixopsArchs.cmake: per-file-class flags) ----
  include(MixopsArchs)
  mixops_arch_flags("${MIXOPS_ARCH_LIST}")
  foreach(_w IN LISTS MIXOPS_ARCH_WARNINGS)
    message(WARNING "mixops: ${_w}")
  endforeach()
  message(STATUS "mixops: CUDA targets ${MIXOPS_ARCHS_BUILT}")

  set(MIXOPS_PTXAS_DIR ${CMAKE_CURRENT_BINARY_DIR}/ptxas)
  file(MAKE_DIRECTORY ${MIXOPS_PTXAS_DIR})
  # Launcher that tees nvcc's stderr (the ptxas -v report) into ${MIXOPS_PTXAS_DIR}; ccache (which
  # replays stderr on a cache hit) runs inside it when installed.
  set(_launcher ${CMAKE_CURRENT_SOURCE_DIR}/cmake/nvcc_report.sh ${MIXOPS_PTXAS_DIR})
  if(MIXOPS_CCACHE)
    list(APPEND _launcher ${MIXOPS_CCACHE})
  endif()
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_launcher})
endif()

function(mixops_collect_cuda_sources out)
  file(GLOB _cu CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/*/*.cu
                                  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/*/cuda.cpp)
  set(_kept "")
  foreach(_f IN LISTS _cu)
    get_filename_component(_name ${_f} NAME)
    if(_name MATCHES "_sm90\\.cu$")
      if(NOT MIXOPS_HAS_SM90)
        continue()
      endif()
      set_source_files_properties(${_f} PROPERTIES COMPILE_OPTIONS "${MIXOPS_CUDA_SM90_FLAGS}")
    elseif(_name MATCHES "_sm80\\.cu$")
      set_source_files_properties(${_f} PROPERTIES COMPILE_OPTIONS "${MIXOPS_CUDA_SM80_FLAGS}")
    elseif(_name MATCHES "\\.cu$")
      set_source_files_properties(${_f} PROPERTIES COMPILE_OPTIONS "${MIXOPS_CUDA_ALL_FLAGS}")
    endif()
    list(APPEND _kept ${_f})
  endforeach()
  set(${out} ${_kept} PARENT_SCOPE)
endfunction()

function(mixops_configure_cuda_target target)
  target_include_directories(${target} SYSTEM PRIVATE
    ${CUTLASS_DIR}/include ${CUTLASS_DIR}/tools/util/include ${CUDAToolkit_INCLUDE_DIRS})
  # ATen/c10 CUDA headers may include cuBLAS/cuSPARSE headers, which the toolkit here lacks but
  # torch's nvidia-* wheels ship.
  file(GLOB _nv_includes ${MIXOPS_TORCH_ROOT}/../nvidia/cu*/include)
  if(_nv_includes)
    target_include_directories(${target} SYSTEM PRIVATE ${_nv_includes})
  endif()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:
    -O3 --expt-relaxed-constexpr --expt-extended-lambda -lineinfo -Xptxas=-v
    -Xcompiler=-fPIC --threads=1 -DNDEBUG>)
  # Link the runtime (shared, the same soname torch loads), c10_cuda; never libcuda: CUTLASS's TMA
  # descriptor calls go through cudaGetDriverEntryPoint, so `import mixops` works without a driver.
  target_link_libraries(${target} PRIVATE c10_cuda CUDA::cudart)
endfunction()
