// SIMT harness shim of cub::DeviceRadixSort: a stable sort on the host, run at once (there are no
// streams), with CUB's calling convention: a first call with d_temp_storage == nullptr asks for
// the temporary storage size, the second needs at least that much. Unsigned integer keys only
// (what our kernels sort), ordered by bits [begin_bit, end_bit).
//
// With DoubleBuffers, CUB leaves the result in whichever buffer its last digit pass wrote: each
// pass of RADIX_BITS flips the selector. The shim does the same (simt::cub_radix_bits passes,
// 8 by default; tests set other values to flip the selector either way) and fills the buffer
// that does not hold the result with poison bytes, so reading the wrong one shows.
#pragma once

#include <cub/util_type.cuh>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace simt {
inline thread_local int cub_radix_bits = 8;  // digit width of the modelled passes
inline thread_local unsigned char cub_poison = 0xA5;
}  // namespace simt

namespace cub {

struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes,
                               DoubleBuffer<K>& d_keys, DoubleBuffer<V>& d_values, int num_items,
                               int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t stream = nullptr) {
    (void)stream;
    if (d_temp_storage == nullptr) return Query(temp_storage_bytes);
    if (temp_storage_bytes < kTempBytes) return cudaErrorInvalidValue;
    const int passes = (end_bit - begin_bit + simt::cub_radix_bits - 1) / simt::cub_radix_bits;
    const int out = d_keys.selector ^ (passes & 1);
    Sort(d_keys.Current(), d_keys.d_buffers[out], d_values.Current(), d_values.d_buffers[out],
         num_items, begin_bit, end_bit);
    if (out != d_keys.selector) {
      std::memset(d_keys.Current(), simt::cub_poison, sizeof(K) * num_items);
      std::memset(d_values.Current(), simt::cub_poison, sizeof(V) * num_items);
    } else {
      std::memset(d_keys.Alternate(), simt::cub_poison, sizeof(K) * num_items);
      std::memset(d_values.Alternate(), simt::cub_poison, sizeof(V) * num_items);
    }
    d_keys.selector = out;
    d_values.selector = out;
    return cudaSuccess;
  }

  template <typename K, typename V>
  static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const K* d_keys_in,
                               K* d_keys_out, const V* d_values_in, V* d_values_out, int num_items,
                               int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t stream = nullptr) {
    (void)stream;
    if (d_temp_storage == nullptr) return Query(temp_storage_bytes);
    if (temp_storage_bytes < kTempBytes) return cudaErrorInvalidValue;
    Sort(d_keys_in, d_keys_out, d_values_in, d_values_out, num_items, begin_bit, end_bit);
    return cudaSuccess;
  }

 private:
  static constexpr size_t kTempBytes = 256;

  static cudaError_t Query(size_t& bytes) {
    bytes = kTempBytes;
    return cudaSuccess;
  }

  template <typename K, typename V>
  static void Sort(const K* keys_in, K* keys_out, const V* vals_in, V* vals_out, int n,
                   int begin_bit, int end_bit) {
    static_assert(std::is_unsigned_v<K>, "the shim sorts unsigned integer keys");
    const int width = end_bit - begin_bit;
    const K mask = width >= static_cast<int>(sizeof(K) * 8) ? ~K(0) : (K(1) << width) - 1;
    auto digit = [&](K k) { return static_cast<K>(k >> begin_bit) & mask; };
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return digit(keys_in[a]) < digit(keys_in[b]); });
    std::vector<K> k(n);
    std::vector<V> v(n);
    for (int i = 0; i < n; ++i) {
      k[i] = keys_in[order[i]];
      v[i] = vals_in[order[i]];
    }
    std::copy(k.begin(), k.end(), keys_out);
    std::copy(v.begin(), v.end(), vals_out);
  }
};

}  // namespace cub
