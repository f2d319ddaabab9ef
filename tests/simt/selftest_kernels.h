// Kernels of the SIMT harness self-test (selftest.cpp runs them): each broken one carries one
// fault class the harness must catch; the correct ones exercise what our kernels use (block and
// warp reductions, shuffles with widths, votes, __match_any_sync, cub::BlockScan, atomics, early
// exits). Written as CUDA device code, compiled as host C++ under simt.h. Also the host-side check
// of the bf16/fp16 conversions.
#pragma once

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>

// ---- broken (or, with the template flag set, fixed) ----------------------------------------------

// Thread t reads what thread t + 1 wrote: needs a block barrier between.
template <bool kSync>
__global__ void k_block_exchange(int* out) {
  MIXOPS_STATIC_SMEM(int[64], s);
  s[threadIdx.x] = threadIdx.x * 3;
  if (kSync) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Lane l reads what lane 31 - l of its warp wrote: needs a warp barrier between.
template <bool kSync>
__global__ void k_warp_exchange(int* out) {
  MIXOPS_STATIC_SMEM(int[64], s);
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
  s[threadIdx.x] = w * 1000 + lane;
  if (kSync) __syncwarp();
  out[threadIdx.x] = s[w * 32 + 31 - lane];
}

// Threads 32..63 read shared memory no thread wrote.
__global__ void k_uninit_static(float* out) {
  MIXOPS_STATIC_SMEM(float[64], s);
  if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void k_uninit_dynamic(float* out) {
  MIXOPS_DYNAMIC_SMEM(float, s);
  if (threadIdx.x % 2 == 0) s[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Two scans through one TempStorage: CUB requires a barrier before the reuse.
template <int N, bool kSync>
__global__ void k_block_scan_twice(int* out) {
  using Scan = cub::BlockScan<int, N>;
  MIXOPS_STATIC_SMEM(typename Scan::TempStorage, tmp);
  int r;
  Scan(tmp).ExclusiveSum(1, r);
  out[threadIdx.x] = r;
  if (kSync) __syncthreads();
  Scan(tmp).ExclusiveSum(2, r);
  out[N + threadIdx.x] = r;
}

__global__ void k_divergent_syncthreads() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void k_divergent_syncwarp() {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncwarp();
  }
}

// Thread 0 waits for its warp at __syncwarp; the other lanes wait for it at __syncthreads.
__global__ void k_deadlock(int* out) {
  if (threadIdx.x == 0) __syncwarp();
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Spins on a flag nobody sets.
__global__ void k_spin_forever() {
  MIXOPS_STATIC_SMEM(int, flag);
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  while (flag == 0) __nanosleep(100);
}

__global__ void k_shfl_exited(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

// Lanes 0..15 shuffle among themselves but read lane 20.
__global__ void k_shfl_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 20);
}

__global__ void k_mask_without_caller() { __syncwarp(threadIdx.x == 3 ? 0x1u : 0xffffffffu); }

// With 48 threads, the second warp has 16 lanes: a full mask names lanes that do not exist.
__global__ void k_shfl_full_mask(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void k_masks_disagree() {
  (void)__shfl_sync(threadIdx.x == 0 ? 0x3u : 0xffffffffu, 1, 0);
}

__global__ void k_nothing() {}

__global__ void k_write_tid(int* out) { out[threadIdx.x] = threadIdx.x; }

__global__ void k_dynamic_smem_overflow() {  // launched with 63 ints of dynamic shared memory
  MIXOPS_DYNAMIC_SMEM(int, s);
  s[threadIdx.x] = 1;
}

__global__ void k_static_smem_overflow() {
  MIXOPS_STATIC_SMEM(int[63], s);
  s[threadIdx.x] = 1;
}

// 1 KiB frames, 1000 deep: far past a 64 KiB fiber stack.
inline int deep(int n) {
  volatile char frame[1024];
  frame[n % 1024] = static_cast<char>(n);
  return n == 0 ? frame[0] : deep(n - 1) + frame[n % 1024];
}
__global__ void k_deep_recursion(int* out) { out[threadIdx.x] = deep(1000); }

// ---- correct -------------------------------------------------------------------------------------

// out[b] = sum of block b's slice of x: a shared-memory tree with a barrier per level.
__global__ void k_block_reduce(const float* x, int n, float* out) {
  MIXOPS_DYNAMIC_SMEM(float, s);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h /= 2) {
    if (threadIdx.x < static_cast<unsigned>(h)) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

__global__ void k_warp_reductions(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 6;
  int v = t;
  for (int h = 16; h; h /= 2) v += __shfl_xor_sync(0xffffffffu, v, h);
  o[0] = v;
  int d = t;
  for (int h = 16; h; h /= 2) d += __shfl_down_sync(0xffffffffu, d, h);
  o[1] = d;
  int s = t;
  for (int h = 1; h < 32; h *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, s, h);
    if (lane >= h) s += y;
  }
  o[2] = s;
  o[3] = __shfl_sync(0xffffffffu, t, 3, 8);
  o[4] = __shfl_xor_sync(0xffffffffu, t, 4, 8);
  o[5] = __shfl_down_sync(0xffffffffu, t, 4);
}

__global__ void k_votes_and_match(unsigned* out) {
  const int lane = threadIdx.x % 32;
  unsigned* o = out + lane * 5;
  o[0] = __ballot_sync(0xffffffffu, lane % 2 == 0);
  o[1] = __any_sync(0xffffffffu, lane == 7);
  o[2] = __all_sync(0xffffffffu, lane != 7);
  o[3] = __match_any_sync(0xffffffffu, lane % 5);
  o[4] = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane));
}

// The expert_scan_kernel pattern: a block-wide exclusive scan in N-sized steps with a carry.
template <int N>
__global__ void k_block_scan_loop(const int* x, int n, int* excl, int* offs) {
  using Scan = cub::BlockScan<int, N>;
  MIXOPS_STATIC_SMEM(typename Scan::TempStorage, tmp);
  int carry = 0;
  for (int e0 = 0; e0 < n; e0 += N) {
    const int e = e0 + threadIdx.x;
    const int v = e < n ? x[e] : 0;
    int ex, sum;
    Scan(tmp).ExclusiveSum(v, ex, sum);
    if (e < n) {
      excl[e] = carry + ex;
      offs[e] = carry + ex + v;
    }
    carry += sum;
    __syncthreads();
  }
}

__global__ void k_histogram(const int* ids, int n, int bins, int* hist, int* maxid) {
  MIXOPS_DYNAMIC_SMEM(int, sh);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) sh[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&sh[ids[i]], 1);
    atomicMax(maxid, ids[i]);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&hist[b], sh[b]);
}

// Threads 40..63 exit at once; barriers still complete (exited threads count as arrived).
__global__ void k_early_exit(int* out) {
  MIXOPS_STATIC_SMEM(int, count);
  if (threadIdx.x >= 40) return;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1);
  __syncwarp();
  __syncthreads();
  out[threadIdx.x] = count + 7;
}

__global__ void k_indices(int* out) {
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  int* o = out + (b * nt + t) * 4;
  o[0] = b;
  o[1] = t;
  o[2] = nt;
  o[3] = gridDim.x * gridDim.y * gridDim.z;
}

__global__ void k_sync_count(int* out) {
  const int c = __syncthreads_count(threadIdx.x % 3 == 0);
  const int a = __syncthreads_and(threadIdx.x < 95);
  const int r = __syncthreads_or(threadIdx.x == 50);
  out[3 * threadIdx.x] = c;
  out[3 * threadIdx.x + 1] = a;
  out[3 * threadIdx.x + 2] = r;
}

// ---- bf16 / fp16 conversions against independent references ------------------------------------

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// "" if the shims convert like CUDA: bf16 by the round-to-nearest-even bit formula (the CPU
// kernels' too), fp16 like GCC's _Float16; NaN -> 0x7fff; widening exact.
inline std::string check_lowp_conversions() {
  std::mt19937 rng(7);
  auto bad = [](const char* what, uint32_t in, unsigned got, unsigned want) {
    char b[128];
    std::snprintf(b, sizeof b, "%s of 0x%08x: got 0x%04x, want 0x%04x", what, in, got, want);
    return std::string(b);
  };
  for (int i = 0; i < (1 << 20); ++i) {
    uint32_t u = rng();
    if (i < 4096) u = (u & 0x807fffffu) | ((100u + i % 56) << 23);  // around the fp16 range
    float f;
    std::memcpy(&f, &u, 4);
    const unsigned b = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    const unsigned want_b = f != f ? 0x7fffu : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    if (b != want_b) return bad("__float2bfloat16_rn", u, b, want_b);
    const unsigned h = __half_as_ushort(__float2half_rn(f));
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t want_h;
    std::memcpy(&want_h, &ref, 2);
    if (f != f) want_h = 0x7fff;
    if (h != want_h) return bad("__float2half_rn", u, h, want_h);
  }
  for (uint32_t v = 0; v < 65536; ++v) {
    const auto s = static_cast<unsigned short>(v);
    const float fb = __bfloat162float(__ushort_as_bfloat16(s));
    if (f32_bits(fb) != (v << 16)) return bad("__bfloat162float", v, f32_bits(fb) >> 16, v);
    _Float16 r;
    std::memcpy(&r, &s, 2);
    const float fh = __half2float(__ushort_as_half(s)), want = static_cast<float>(r);
    if (fh == fh && f32_bits(fh) != f32_bits(want)) return bad("__half2float", v, 0, v);
    if (fh == fh && __half_as_ushort(__float2half_rn(fh)) != s)
      return bad("fp16 round trip", v, 0, v);
  }
  return "";
}
