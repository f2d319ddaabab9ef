// SIMT harness: the device functions that are not collectives, mapped to host C++. Atomics with
// CUDA's overload set (so a call nvcc would reject, e.g. atomicAdd on a signed 64-bit pointer, is
// rejected here too) as plain read-modify-writes: the fibers of one launch share one OS thread
// and switch only at collectives, so nothing interleaves inside an atomic. Bit intrinsics, bit
// casts, the correctly rounded __f*_rn family, min/max, loads with cache hints, fences.
//
// Approximate intrinsics (__expf, __logf, __fdividef, rsqrtf, ...) map to the host's correctly
// rounded or glibc functions, whose last bits differ from the GPU's: compare their results with
// a tolerance. Build with -ffp-contract=off like the project's host code (nvcc contracts a*b+c
// into FMAs on the device by default; kernels that need exact bits call det:: or __f*_rn).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- atomics ----------------------------------------------------------------------------------

#define SIMT_ATOMIC(name, T, expr)   \
  inline T name(T* address, T val) { \
    const T old = *address;          \
    *address = (expr);               \
    return old;                      \
  }
SIMT_ATOMIC(atomicAdd, int, old + val)
SIMT_ATOMIC(atomicAdd, unsigned int, old + val)
SIMT_ATOMIC(atomicAdd, unsigned long long, old + val)
SIMT_ATOMIC(atomicAdd, float, old + val)
SIMT_ATOMIC(atomicAdd, double, old + val)
SIMT_ATOMIC(atomicSub, int, old - val)
SIMT_ATOMIC(atomicSub, unsigned int, old - val)
SIMT_ATOMIC(atomicExch, int, val)
SIMT_ATOMIC(atomicExch, unsigned int, val)
SIMT_ATOMIC(atomicExch, unsigned long long, val)
SIMT_ATOMIC(atomicExch, float, val)
SIMT_ATOMIC(atomicMin, int, val < old ? val : old)
SIMT_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
SIMT_ATOMIC(atomicMin, long long, val < old ? val : old)
SIMT_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
SIMT_ATOMIC(atomicMax, int, val > old ? val : old)
SIMT_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
SIMT_ATOMIC(atomicMax, long long, val > old ? val : old)
SIMT_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
SIMT_ATOMIC(atomicAnd, int, old& val)
SIMT_ATOMIC(atomicAnd, unsigned int, old& val)
SIMT_ATOMIC(atomicAnd, unsigned long long, old& val)
SIMT_ATOMIC(atomicOr, int, old | val)
SIMT_ATOMIC(atomicOr, unsigned int, old | val)
SIMT_ATOMIC(atomicOr, unsigned long long, old | val)
SIMT_ATOMIC(atomicXor, int, old ^ val)
SIMT_ATOMIC(atomicXor, unsigned int, old ^ val)
SIMT_ATOMIC(atomicXor, unsigned long long, old ^ val)
SIMT_ATOMIC(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
SIMT_ATOMIC(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef SIMT_ATOMIC

#define SIMT_CAS(T)                                  \
  inline T atomicCAS(T* address, T compare, T val) { \
    const T old = *address;                          \
    if (old == compare) *address = val;              \
    return old;                                      \
  }
SIMT_CAS(int)
SIMT_CAS(unsigned int)
SIMT_CAS(unsigned long long)
SIMT_CAS(unsigned short)
#undef SIMT_CAS

// ---- bits -------------------------------------------------------------------------------------

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i)
    r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}

namespace simt::detail {
template <class To, class From>
inline To bits(From f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}
}  // namespace simt::detail

inline float __int_as_float(int x) { return simt::detail::bits<float>(x); }
inline int __float_as_int(float x) { return simt::detail::bits<int>(x); }
inline float __uint_as_float(unsigned int x) { return simt::detail::bits<float>(x); }
inline unsigned int __float_as_uint(float x) { return simt::detail::bits<unsigned int>(x); }
inline double __longlong_as_double(long long x) { return simt::detail::bits<double>(x); }
inline long long __double_as_longlong(double x) { return simt::detail::bits<long long>(x); }
inline int __double2hiint(double x) { return static_cast<int>(__double_as_longlong(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(__double_as_longlong(x)); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((static_cast<long long>(hi) << 32) | static_cast<unsigned>(lo));
}

// ---- arithmetic -------------------------------------------------------------------------------

// CUDA's min/max: the common type of the arguments (fminf/fmaxf semantics for floating point).
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmin(C(a), C(b));
  else
    return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>)
    return std::fmax(C(a), C(b));
  else
    return C(a) < C(b) ? C(b) : C(a);
}

using std::fma;  // the float overload, as CUDA's fma(float, float, float)

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// ---- memory -----------------------------------------------------------------------------------

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline T __ldca(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldlu(const T* p) {
  return *p;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stwb(T* p, T v) {
  *p = v;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
