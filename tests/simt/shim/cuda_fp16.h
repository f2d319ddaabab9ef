// SIMT harness shim of cuda_fp16.h: __half as 16 bits with CUDA's conversions (round to nearest
// even, canonical NaN 0x7fff), its implicit float conversions and float-computed operators (as
// nvcc compiles them without __CUDA_NO_HALF_CONVERSIONS__ / _OPERATORS__, like this project).
#pragma once

#include "simt_lowp.h"

struct __half_raw {
  unsigned short x;
};

struct __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(simt::lowp::round_from_double<5, 10>(f)) {}
  __half(double d) : __x(simt::lowp::round_from_double<5, 10>(d)) {}
  operator float() const { return simt::lowp::widen<5, 10>(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __half2 {
  __half x, y;
};

inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline float __low2float(__half2 h) { return static_cast<float>(h.x); }
inline float __high2float(__half2 h) { return static_cast<float>(h.y); }

inline __half operator+(__half a, __half b) { return __half(float(a) + float(b)); }
inline __half operator-(__half a, __half b) { return __half(float(a) - float(b)); }
inline __half operator*(__half a, __half b) { return __half(float(a) * float(b)); }
inline __half operator/(__half a, __half b) { return __half(float(a) / float(b)); }
inline __half operator-(__half a) {
  return __half(__half_raw{static_cast<unsigned short>(a.__x ^ 0x8000u)});
}
inline bool operator==(__half a, __half b) { return float(a) == float(b); }
inline bool operator!=(__half a, __half b) { return float(a) != float(b); }
inline bool operator<(__half a, __half b) { return float(a) < float(b); }
inline bool operator>(__half a, __half b) { return float(a) > float(b); }
inline bool operator<=(__half a, __half b) { return float(a) <= float(b); }
inline bool operator>=(__half a, __half b) { return float(a) >= float(b); }
