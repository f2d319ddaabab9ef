// Deterministic float math shared by the CPU and CUDA kernels (MIXOPS_HOST_DEVICE).
//
// Expert selection must come out the same on both backends. Where selection cannot be done on
// the logits themselves (a bias added to sigmoid/softmax scores, group scores summing two
// scores), the scores are computed here with only correctly rounded IEEE operations: add, mul
// and div, each spelled out so neither compiler contracts a*b+c into a fused multiply-add
// (device: the __f*_rn intrinsics, which nvcc never contracts; host: the CPU sources are built
// with -ffp-contract=off), and an exp of our own instead of the platforms' expf, whose last bits
// differ between glibc and CUDA's libdevice. Row sums run in one fixed order (canonical_sum),
// the order a warp's butterfly reduction produces, so a CPU loop and a GPU warp agree bit for bit.
//
// double (used for gradcheck) needs no bitwise agreement and uses the platform's exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/macros.h"

namespace mixops {
namespace det {

#if defined(__CUDA_ARCH__)
MIXOPS_INLINE float add(float a, float b) { return __fadd_rn(a, b); }
MIXOPS_INLINE float sub(float a, float b) { return __fsub_rn(a, b); }
MIXOPS_INLINE float mul(float a, float b) { return __fmul_rn(a, b); }
MIXOPS_INLINE float div(float a, float b) { return __fdiv_rn(a, b); }
MIXOPS_INLINE double add(double a, double b) { return __dadd_rn(a, b); }
MIXOPS_INLINE double sub(double a, double b) { return __dsub_rn(a, b); }
MIXOPS_INLINE double mul(double a, double b) { return __dmul_rn(a, b); }
MIXOPS_INLINE double div(double a, double b) { return __ddiv_rn(a, b); }
MIXOPS_INLINE float bits_to_float(int32_t b) { return __int_as_float(b); }
#else
MIXOPS_INLINE float add(float a, float b) { return a + b; }
MIXOPS_INLINE float sub(float a, float b) { return a - b; }
MIXOPS_INLINE float mul(float a, float b) { return a * b; }
MIXOPS_INLINE float div(float a, float b) { return a / b; }
MIXOPS_INLINE double add(double a, double b) { return a + b; }
MIXOPS_INLINE double sub(double a, double b) { return a - b; }
MIXOPS_INLINE double mul(double a, double b) { return a * b; }
MIXOPS_INLINE double div(double a, double b) { return a / b; }
inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
#endif

MIXOPS_INLINE bool is_nan(float x) { return x != x; }
MIXOPS_INLINE bool is_nan(double x) { return x != x; }

// exp(x) in float, within ~2 ulp of the true value, bit-identical on host and device.
// Cody-Waite reduction x = n*ln2 + r (ln2 split so n*ln2_hi is exact; n rounded to nearest with
// the 1.5*2^23 trick), a degree-6 Taylor polynomial in Horner form for exp(r) on |r| <= ln2/2,
// then scaling by 2^n built from bits. Branch-free (selects only), so host loops vectorise.
// Results below FLT_MIN flush to 0 (no subnormals), above FLT_MAX give +inf, NaN stays NaN.
MIXOPS_INLINE float exp(float x) {
  constexpr float kLo = -87.3365402f, kHi = 88.7228317f, kRound = 12582912.0f;  // 1.5 * 2^23
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  xc = is_nan(xc) ? 0.0f : xc;
  const float n = sub(add(mul(xc, 1.44269502f), kRound), kRound);  // round to nearest (even)
  float r = sub(xc, mul(n, 0.693145751953125f));  // exact product: ln2_hi has 15 bits
  r = sub(r, mul(n, 1.42860677e-06f));
  float p = 1.38888889e-03f;  // 1/720
  p = add(mul(p, r), 8.33333377e-03f);
  p = add(mul(p, r), 4.16666679e-02f);
  p = add(mul(p, r), 1.66666672e-01f);
  p = add(mul(p, r), 0.5f);
  p = add(mul(p, r), 1.0f);
  p = add(mul(p, r), 1.0f);
  // 2^n in two halves, each a normal float (n is in [-126, 128]).
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni / 2, n2 = ni - n1;
  float e = mul(mul(p, bits_to_float((n1 + 127) << 23)), bits_to_float((n2 + 127) << 23));
  e = x < kLo ? 0.0f : e;
  e = x > kHi ? INFINITY : e;
  return is_nan(x) ? x : e;
}
MIXOPS_INLINE double exp(double x) { return ::exp(x); }

MIXOPS_INLINE float log(float x) { return ::logf(x); }  // lse only; not used for selection
MIXOPS_INLINE double log(double x) { return ::log(x); }

template <class T>
MIXOPS_INLINE T sigmoid(T x) {
  return div(T(1), add(T(1), exp(-x)));
}

// The canonical order of a row sum: "lane" l = 0..31 adds the values at l, l+32, l+64, ...
// (ascending, from 0), then the 32 partials combine by halving: p[l] += p[l + h] for
// h = 16, 8, 4, 2, 1. That is exactly what a warp computes with
//   v = partial(lane); for (h = 16; h; h /= 2) v = v + __shfl_xor_sync(~0u, v, h);
// (float addition is commutative, so every lane ends with p[0]).
constexpr int kSumLanes = 32;

template <class T, class Value>
MIXOPS_INLINE T canonical_sum(int64_t n, const Value& value) {
  T p[kSumLanes];
  for (int l = 0; l < kSumLanes; ++l) p[l] = T(0);
  // Lane l's values in ascending order, a row of 32 at a time (so host loops vectorise).
  int64_t base = 0;
  for (; base + kSumLanes <= n; base += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) p[l] = add(p[l], value(base + l));
  for (int l = 0; base + l < n; ++l) p[l] = add(p[l], value(base + l));
  for (int h = kSumLanes / 2; h > 0; h /= 2)
    for (int l = 0; l < h; ++l) p[l] = add(p[l], p[l + h]);
  return p[0];
}

}  // namespace det
}  // namespace mixops
