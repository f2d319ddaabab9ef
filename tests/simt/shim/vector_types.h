// SIMT harness shim of CUDA's vector_types.h: dim3 and the built-in vector types (uint3, uint4,
// float4, ...) with CUDA's sizes and alignments, for kernel headers compiled as host C++.
#pragma once

#include <cstddef>

#define SIMT_VEC2(T, name, align) \
  struct alignas(align) name {    \
    T x, y;                       \
  };                              \
  inline constexpr name make_##name(T x, T y) { return name{x, y}; }
#define SIMT_VEC3(T, name) \
  struct name {            \
    T x, y, z;             \
  };                       \
  inline constexpr name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define SIMT_VEC4(T, name, align) \
  struct alignas(align) name {    \
    T x, y, z, w;                 \
  };                              \
  inline constexpr name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

SIMT_VEC2(char, char2, 2)
SIMT_VEC2(unsigned char, uchar2, 2)
SIMT_VEC2(short, short2, 4)
SIMT_VEC2(unsigned short, ushort2, 4)
SIMT_VEC2(int, int2, 8)
SIMT_VEC2(unsigned int, uint2, 8)
SIMT_VEC2(float, float2, 8)
SIMT_VEC2(long long, longlong2, 16)
SIMT_VEC2(unsigned long long, ulonglong2, 16)
SIMT_VEC2(double, double2, 16)
SIMT_VEC3(int, int3)
SIMT_VEC3(unsigned int, uint3)
SIMT_VEC3(float, float3)
SIMT_VEC4(char, char4, 4)
SIMT_VEC4(unsigned char, uchar4, 4)
SIMT_VEC4(short, short4, 8)
SIMT_VEC4(unsigned short, ushort4, 8)
SIMT_VEC4(int, int4, 16)
SIMT_VEC4(unsigned int, uint4, 16)
SIMT_VEC4(float, float4, 16)

#undef SIMT_VEC2
#undef SIMT_VEC3
#undef SIMT_VEC4

// Launch dimensions: unset components are 1.
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
