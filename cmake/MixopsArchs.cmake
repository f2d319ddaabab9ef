# CUDA architecture flags from a TORCH_CUDA_ARCH_LIST-style list, one set per file class. Pure
# string work (no toolkit needed), so tests/test_build.py runs it in script mode through
# cmake/print_arch_flags.cmake for several lists.
#
# List syntax: entries separated by ';' or ' ', each "X.Y", "X.Ya" (arch-specific features, e.g.
# 9.0a for wgmma/TMA) or "X.Yf", optionally followed by "+PTX". nvcc 13 compiles for 7.5 and up.
#
# File classes (chosen by name in MixopsCuda.cmake):
#   *_sm90.cu  sm_90a SASS only, and only when 9.0a is listed (wgmma/TMA kernels);
#   *_sm80.cu  CUTLASS 2 kernels that need sm_80 (cp.async, mma.sync): SASS for every listed arch
#              >= 8.0, PTX for max(8.0, lowest listed) and for every "+PTX" arch >= 8.0. Never PTX
#              below 8.0: a GPU JIT-compiling compute_75 PTX of these kernels reaches CUTLASS's
#              "not implemented" trap and loses its CUDA context;
#   other .cu  SASS for every listed arch, PTX for the lowest listed and every "+PTX" arch.
#
# mixops_arch_flags(<list>) sets in the caller's scope:
#   MIXOPS_CUDA_ALL_FLAGS, MIXOPS_CUDA_SM80_FLAGS, MIXOPS_CUDA_SM90_FLAGS  (-gencode lists)
#   MIXOPS_HAS_SM90      ON when 9.0a is listed
#   MIXOPS_ARCHS_BUILT   "sm_80,sm_90a,compute_80" style summary of everything emitted
#   MIXOPS_ARCH_WARNINGS list of warnings for the caller to print
function(mixops_arch_flags arch_list)
  string(REPLACE " " ";" _entries "${arch_list}")
  set(_all "")
  set(_sm80 "")
  set(_sm90 "")
  set(_ptx "")        # arch numbers marked +PTX
  set(_lowest "")     # lowest arch number listed (digits only)
  set(_lowest80 "")   # lowest listed >= 80
  set(_has90 OFF)
  set(_has90a OFF)
  set(_warnings "")
  foreach(_e IN LISTS _entries)
    if(_e STREQUAL "")
      continue()
    endif()
    set(_want_ptx OFF)
    if(_e MATCHES "\\+PTX$")
      set(_want_ptx ON)
      string(REGEX REPLACE "\\+PTX$" "" _e "${_e}")
    endif()
    if(NOT _e MATCHES "^([0-9]+)\\.([0-9])([af]?)$")
      message(FATAL_ERROR "mixops: cannot parse CUDA arch '${_e}' in '${arch_list}' "
                          "(expected e.g. 8.0, 9.0a or 9.0+PTX)")
    endif()
    set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}")
    set(_suffix "${CMAKE_MATCH_3}")
    if(_num LESS 75)
      message(FATAL_ERROR "mixops: CUDA arch ${_e} is below 7.5, the oldest nvcc 13 compiles for; "
                          "remove it from TORCH_CUDA_ARCH_LIST ('${arch_list}')")
    endif()
    set(_code "${_num}${_suffix}")
    list(APPEND _all "-gencode=arch=compute_${_code},code=sm_${_code}")
    if(_num GREATER_EQUAL 80)
      list(APPEND _sm80 "-gencode=arch=compute_${_code},code=sm_${_code}")
      if(NOT _lowest80 OR _num LESS _lowest80)
        set(_lowest80 ${_num})
      endif()
    endif()
    if(_code STREQUAL "90a")
      set(_has90a ON)
    elseif(_code STREQUAL "90")
      set(_has90 ON)
    endif()
    if(NOT _lowest OR _num LESS _lowest)
      set(_lowest ${_num})
    endif()
    if(_want_ptx)
      list(APPEND _ptx ${_code})
    endif()
  endforeach()
  if(NOT _lowest)
    message(FATAL_ERROR "mixops: empty CUDA arch list")
  endif()

  # PTX: the lowest arch (so newer GPUs can JIT every kernel) plus the +PTX ones.
  set(_ptx_all ${_lowest} ${_ptx})
  set(_floor80 80)
  if(_lowest GREATER 80)
    set(_floor80 ${_lowest})
  endif()
  set(_ptx_sm80 ${_floor80})
  foreach(_p IN LISTS _ptx)
    string(REGEX REPLACE "[af]$" "" _pn "${_p}")
    if(_pn GREATER_EQUAL 80)
      list(APPEND _ptx_sm80 ${_p})
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _ptx_all)
  list(REMOVE_DUPLICATES _ptx_sm80)
  foreach(_p IN LISTS _ptx_all)
    list(APPEND _all "-gencode=arch=compute_${_p},code=compute_${_p}")
  endforeach()
  foreach(_p IN LISTS _ptx_sm80)
    list(APPEND _sm80 "-gencode=arch=compute_${_p},code=compute_${_p}")
  endforeach()
  list(REMOVE_DUPLICATES _all)
  list(REMOVE_DUPLICATES _sm80)
  if(_has90a)
    set(_sm90 "-gencode=arch=compute_90a,code=sm_90a")
  endif()
  if(_has90 AND NOT _has90a)
    list(APPEND _warnings "TORCH_CUDA_ARCH_LIST has 9.0 but not 9.0a: H100/H200 will run the \
CUTLASS 2 (sm_80-style) grouped GEMM instead of the wgmma/TMA kernels. Add 9.0a to build them.")
  endif()

  # Summary of what is emitted, e.g. sm_80,sm_90a,compute_80.
  set(_built "")
  foreach(_f IN LISTS _all _sm80 _sm90)
    if(_f MATCHES "code=(sm|compute)_([0-9]+[af]?)$")
      list(APPEND _built "${CMAKE_MATCH_1}_${CMAKE_MATCH_2}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES _built)
  string(REPLACE ";" "," _built "${_built}")

  set(MIXOPS_CUDA_ALL_FLAGS "${_all}" PARENT_SCOPE)
  set(MIXOPS_CUDA_SM80_FLAGS "${_sm80}" PARENT_SCOPE)
  set(MIXOPS_CUDA_SM90_FLAGS "${_sm90}" PARENT_SCOPE)
  set(MIXOPS_HAS_SM90 ${_has90a} PARENT_SCOPE)
  set(MIXOPS_ARCHS_BUILT "${_built}" PARENT_SCOPE)
  set(MIXOPS_ARCH_WARNINGS "${_warnings}" PARENT_SCOPE)
endfunction()
