// SIMT harness: the bit-level conversions behind the cuda_fp16.h / cuda_bf16.h shims. A double
// (every float converts to one exactly) rounds to a binary format with E exponent and M mantissa
// bits by round-to-nearest-even, with subnormals, overflow to infinity and NaN -> the canonical
// 0x7fff that CUDA's cvt.rn.{f16,bf16}.f32 and its host fallbacks return. Widening is exact.
#pragma once

#include <cstdint>
#include <cstring>

namespace simt::lowp {

template <int E, int M>
inline uint16_t round_from_double(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 63) << (E + M));
  const int exp = static_cast<int>((u >> 52) & 0x7ff);
  const uint64_t mant = u & ((uint64_t(1) << 52) - 1);
  constexpr int kBias = (1 << (E - 1)) - 1;
  constexpr uint16_t kInf = static_cast<uint16_t>(((1u << E) - 1) << M);
  if (exp == 0x7ff) return mant != 0 ? uint16_t(0x7fff) : static_cast<uint16_t>(sign | kInf);
  if (exp == 0) return sign;  // zero or a double subnormal: far below the target's subnormals
  const int e = exp - 1023;
  if (e > kBias) return static_cast<uint16_t>(sign | kInf);
  const uint64_t sig = (uint64_t(1) << 52) | mant;  // 53 bits
  const bool normal = e >= 1 - kBias;
  const int shift = 52 - M + (normal ? 0 : (1 - kBias) - e);
  if (shift > 63) return sign;
  uint64_t q = sig >> shift;
  const uint64_t rem = sig & ((uint64_t(1) << shift) - 1), half = uint64_t(1) << (shift - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;  // a carry moves into the exponent field
  const uint64_t bits =
      normal ? (static_cast<uint64_t>(e + kBias) << M) + q - (uint64_t(1) << M) : q;
  return static_cast<uint16_t>(sign | bits);  // bits == kInf when rounding overflows
}

template <int E, int M>
inline float widen(uint16_t h) {
  if constexpr (E == 8) {  // bf16: the top half of a float (its subnormals are float's)
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  constexpr int kBias = (1 << (E - 1)) - 1;
  const uint32_t sign = static_cast<uint32_t>(h >> (E + M)) << 31;
  const int exp = (h >> M) & ((1 << E) - 1);
  uint32_t mant = h & ((1u << M) - 1);
  uint32_t u;
  if (exp == (1 << E) - 1) {
    u = sign | 0x7f800000u | (mant << (23 - M));
  } else if (exp != 0) {
    u = sign | (static_cast<uint32_t>(exp - kBias + 127) << 23) | (mant << (23 - M));
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: normalise (float's range holds every f16 subnormal)
    int e = 1 - kBias;
    while ((mant & (1u << M)) == 0) {
      mant <<= 1;
      --e;
    }
    u = sign | (static_cast<uint32_t>(e + 127) << 23) | ((mant & ((1u << M) - 1)) << (23 - M));
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace simt::lowp
