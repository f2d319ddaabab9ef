// permute, unpermute and their backward ops on CPU (formats: csrc/permute/permute.h).
// permute: per-chunk expert histograms (chunks of permute::kChunkSlots slots, in parallel), a scan
// giving each chunk its first row per expert, then each chunk places its slots in order (stable,
// so rows of an expert are in slot order), and the rows are gathered in output order. Capacity
// first ranks the slots of
// each expert in priority order (a sequential pass over choice-major slots, or a stable sort per
// choice rank with priorities) and drops those ranked past the capacity.
// unpermute: a token per iteration gathers its k rows (fp32 accumulation, j in order): no
// atomics, deterministic whatever the thread count.
// rows_to_slots / slots_to_rows: byte copies of head_dim-element pieces, written in output order
// (a token's slots, or a row's heads); no dtype switch, as zero is all-zero bytes in every dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "core/cpu_alloc.h"
#include "core/elem_io.h"
#include "permute/check.h"

namespace mixops {
namespace {

constexpr int64_t kTokenGrain = 16;  // tokens per parallel task in the row loops
// unpermute reads a token's rows side by side, a block of columns at a time: T=4096, k=8,
// hidden 1024 fp32 took 21.5 ms row after row (each 4 KiB row a short stream the prefetchers
// ramp up on) and 11 ms side by side; torch's contiguous sum of the same bytes takes 8.9 ms.
// Up to kMaxGatherRows rows per token live on the stack (more: a heap array per task).
constexpr int kMaxGatherRows = 16;
constexpr int64_t kColumnBlock = 64;
constexpr int kDotLanes = 16;  // partial sums of the dot products (unpermute_weights_backward)

// e_of[i] = the expert of slot i or -1; returns false if some id is out of range.
template <class id_t>
bool experts_of_slots(const id_t* ids, int64_t slots, int32_t num_experts, int32_t* e_of) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, slots, permute::kChunkSlots, [&](int64_t i0, int64_t i1) {
    bool b = false;
    for (int64_t i = i0; i < i1; ++i) e_of[i] = permute::expert_of(ids[i], num_experts, &b);
    if (b) bad = true;
  });
  return !bad;
}

// Capacity: ranks each expert's slots in priority order and sets e_of = -1 for the dropped ones.
void apply_capacity(int32_t* e_of, int64_t num_tokens, int32_t k, int32_t num_experts,
                    int64_t capacity, const float* priority, int32_t* dropped) {
  std::vector<int64_t> taken(num_experts, 0);
  auto visit = [&](int64_t i) {
    const int32_t e = e_of[i];
    if (e < 0) return;
    if (taken[e]++ >= capacity) {
      e_of[i] = -1;
      ++dropped[e];
    }
  };
  std::vector<int64_t> order;
  for (int32_t j = 0; j < k; ++j) {  // every first choice before any second choice, ...
    if (!priority) {
      for (int64_t t = 0; t < num_tokens; ++t) visit(t * k + j);
      continue;
    }
    order.resize(num_tokens);
    for (int64_t t = 0; t < num_tokens; ++t) order[t] = t;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return permute::priority_before(true, priority[a * k + j], a, priority[b * k + j], b);
    });
    for (int64_t t : order) visit(t * k + j);
  }
}

// Places every slot with an expert (e_of >= 0): row_map, offsets, and the token of every row
// (src_token, for the gather). Returns the rows used.
int64_t place_rows(const int32_t* e_of, int64_t slots, int32_t k, int32_t num_experts,
                   int32_t* offsets, int32_t* row_map, int32_t* src_token) {
  const int64_t chunks = permute::num_chunks(slots), e = num_experts;
  std::vector<int32_t> base(chunks * e, 0);  // histogram, then each chunk's next row per expert
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* h = base.data() + c * e;
      for (int64_t i = c * permute::kChunkSlots;
           i < std::min(slots, (c + 1) * permute::kChunkSlots); ++i)
        if (e_of[i] >= 0) ++h[e_of[i]];
    }
  });
  int64_t row = 0;
  for (int64_t x_e = 0; x_e < e; ++x_e) {  // expert-major exclusive scan over (expert, chunk)
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t n = base[c * e + x_e];
      base[c * e + x_e] = static_cast<int32_t>(row);
      row += n;
    }
    offsets[x_e] = static_cast<int32_t>(row);
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t* next = base.data() + c * e;
      for (int64_t i = c * permute::kChunkSlots;
           i < std::min(slots, (c + 1) * permute::kChunkSlots); ++i) {
        const int32_t ex = e_of[i];
        if (ex < 0) {
          row_map[i] = kNoRow;
          continue;
        }
        const int32_t r = next[ex]++;
        row_map[i] = r;
        src_token[r] = static_cast<int32_t>(i / k);
      }
    }
  });
  return row;
}

// x_sorted[r] = x[src_token[r]] for r < used, zero after: written in order, a contiguous range
// of rows per thread (sequential stores and page faults; scattering rows by slot was slower).
void gather_rows(const uint8_t* x, int64_t x_row_bytes, int64_t row_bytes, const int32_t* src,
                 int64_t used, int64_t num_rows, uint8_t* x_sorted) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, num_rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < std::min(r1, used); ++r)
      std::memcpy(x_sorted + r * row_bytes, x + src[r] * x_row_bytes, row_bytes);
    if (r1 > used) {
      const int64_t z0 = std::max(r0, used);
      std::memset(x_sorted + z0 * row_bytes, 0, (r1 - z0) * row_bytes);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute_cpu(
    const at::Tensor& x_in, const at::Tensor& ids_in, int64_t num_experts,
    std::optional<int64_t> capacity, const std::optional<at::Tensor>& priority) {
  const int64_t num_rows = permute_check(x_in, ids_in, num_experts, capacity, priority);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const int64_t t = x.size(0), h = x.size(1), k = ids.size(1), slots = t * k;
  const auto iopt = x.options().dtype(at::kInt);
  at::Tensor x_sorted = empty_large({num_rows, h}, x.options());
  at::Tensor offsets = at::empty({num_experts}, iopt);
  at::Tensor row_map = at::empty({t, k}, iopt);
  at::Tensor dropped = at::zeros({num_experts}, iopt);
  std::vector<int32_t> e_of(slots);
  const bool ok = ids.scalar_type() == at::kInt
                      ? experts_of_slots(ids.data_ptr<int32_t>(), slots, num_experts, e_of.data())
                      : experts_of_slots(ids.data_ptr<int64_t>(), slots, num_experts, e_of.data());
  if (!ok) permute_check_ids_values(ids, num_experts);  // raises, naming the first bad id
  if (capacity) {
    const at::Tensor pr = priority ? priority->to(at::kFloat).contiguous() : at::Tensor();
    apply_capacity(e_of.data(), t, static_cast<int32_t>(k), static_cast<int32_t>(num_experts),
                   *capacity, priority ? pr.data_ptr<float>() : nullptr,
                   dropped.data_ptr<int32_t>());
  }
  std::vector<int32_t> src_token(num_rows);
  const int64_t used =
      place_rows(e_of.data(), slots, static_cast<int32_t>(k), static_cast<int32_t>(num_experts),
                 offsets.data_ptr<int32_t>(), row_map.data_ptr<int32_t>(), src_token.data());
  gather_rows(static_cast<const uint8_t*>(x.data_ptr()), x.stride(0) * x.element_size(),
              h * x.element_size(), src_token.data(), used, num_rows,
              static_cast<uint8_t*>(x_sorted.data_ptr()));
  return {x_sorted, offsets, row_map, dropped};
}

// Weight of slot i (1 without weights), read in its own dtype.
template <class acc_t>
acc_t weight_at(const at::Tensor& w, int64_t i) {
  if (!w.defined()) return acc_t(1);
  switch (w.scalar_type()) {
    case at::kFloat: return static_cast<acc_t>(w.data_ptr<float>()[i]);
    case at::kDouble: return static_cast<acc_t>(w.data_ptr<double>()[i]);
    case at::kBFloat16: return static_cast<acc_t>(w.data_ptr<at::BFloat16>()[i]);
    default: return static_cast<acc_t>(w.data_ptr<at::Half>()[i]);
  }
}

// The row loops of unpermute and its backward ops, compiled for AVX2 and the baseline.

// out = sum_i wts[i] * rows[i], over all n rows side by side, a block of kColumnBlock columns at a
// time (n concurrent streams); each element sums i = 0..n-1 in order in an fp32 (fp64)
// accumulator held for the whole sum, rounded to the output dtype once.
template <class T>
MIXOPS_CPU_CLONES void gather_sum_row(T* __restrict__ out, const T* const* rows,
                                      const acc_of<T>* wts, int n, int64_t h) {
  using acc_t = acc_of<T>;
  for (int64_t c0 = 0; c0 < h; c0 += kColumnBlock) {
    const int64_t nc = std::min<int64_t>(kColumnBlock, h - c0);
    acc_t acc[kColumnBlock];
    for (int64_t c = 0; c < kColumnBlock; ++c) acc[c] = acc_t(0);
    for (int i = 0; i < n; ++i) {
      const T* __restrict__ row = rows[i] + c0;
      const acc_t wi = wts[i];
      if (nc == kColumnBlock) {
        for (int64_t c = 0; c < kColumnBlock; ++c) acc[c] += wi * load(row, c);
      } else {
        for (int64_t c = 0; c < nc; ++c) acc[c] += wi * load(row, c);
      }
    }
    for (int64_t c = 0; c < nc; ++c) store(out, c0 + c, acc[c]);
  }
}

// dst = w * src (one rounded product per element).
template <class T>
MIXOPS_CPU_CLONES void scale_row(T* __restrict__ dst, const T* __restrict__ src, acc_of<T> w,
                                 int64_t h) {
  for (int64_t c = 0; c < h; ++c) store(dst, c, w * load(src, c));
}

// sum_c a[c] * b[c] over n elements in kDotLanes independent partial sums (a loop the compiler
// vectorises; one running sum is a dependency chain it may not reorder), added in lane order.
template <class T>
MIXOPS_CPU_CLONES acc_of<T> dot_block(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using acc_t = acc_of<T>;
  acc_t lanes[kDotLanes] = {};
  int64_t c = 0;
  for (; c + kDotLanes <= n; c += kDotLanes) {
    for (int l = 0; l < kDotLanes; ++l) lanes[l] += load(a, c + l) * load(b, c + l);
  }
  acc_t sum = 0;
  for (int l = 0; l < kDotLanes; ++l) sum += lanes[l];
  for (; c < n; ++c) sum += load(a, c) * load(b, c);
  return sum;
}

at::Tensor unpermute_cpu(const at::Tensor& y_sorted_in, const at::Tensor& row_map_in,
                         const std::optional<at::Tensor>& weights_in) {
  unpermute_check(y_sorted_in, row_map_in, weights_in);
  const at::Tensor y_sorted = y_sorted_in.stride(1) == 1 ? y_sorted_in : y_sorted_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t num_rows = y_sorted.size(0);
  unpermute_check_row_map_values(row_map, num_rows, "unpermute");
  const at::Tensor w = weights_in ? weights_in->contiguous() : at::Tensor();
  const int64_t t = row_map.size(0), k = row_map.size(1), h = y_sorted.size(1);
  at::Tensor y = empty_large({t, h}, y_sorted.options());
  const int32_t* rm = row_map.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unpermute", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* src = y_sorted.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    const int64_t ld = y_sorted.stride(0);
    at::parallel_for(0, t, kTokenGrain, [&](int64_t t0, int64_t t1) {
      // The token's rows and weights: on the stack for k <= kMaxGatherRows, else one heap
      // array per task (k > 16 is rare; the common case allocates nothing).
      const scalar_t* rows_stack[kMaxGatherRows];
      acc_t wts_stack[kMaxGatherRows];
      std::vector<const scalar_t*> rows_heap(k > kMaxGatherRows ? k : 0);
      std::vector<acc_t> wts_heap(k > kMaxGatherRows ? k : 0);
      const scalar_t** rows = k > kMaxGatherRows ? rows_heap.data() : rows_stack;
      acc_t* wts = k > kMaxGatherRows ? wts_heap.data() : wts_stack;
      for (int64_t tok = t0; tok < t1; ++tok) {
        scalar_t* out = dst + tok * h;
        int n = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int32_t r = rm[tok * k + j];
          if (r < 0) continue;
          rows[n] = src + r * ld;
          wts[n++] = weight_at<acc_t>(w, tok * k + j);
        }
        // All the token's rows side by side, a block of kColumnBlock columns at a time (k
        // concurrent streams); each element sums j = 0..k-1 in order in an fp32 (fp64)
        // accumulator held for the whole sum, rounded to the output dtype once.
        gather_sum_row(out, rows, wts, n, h);
      }
    });
  });
  return y;
}

at::Tensor unpermute_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& row_map_in,
                                  const std::optional<at::Tensor>& weights_in, int64_t num_rows) {
  unpermute_backward_check(grad_y_in, row_map_in, weights_in, num_rows);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  // row -> the slot mapped to it, or -1 (rows past slot_of.size() have none)
  const std::vector<int32_t> slot_of = row_map_inverse(row_map, num_rows, "unpermute_backward");
  const int64_t mapped = static_cast<int64_t>(slot_of.size());
  const at::Tensor w = weights_in ? weights_in->contiguous() : at::Tensor();
  const int64_t k = row_map.size(1), h = grad_y.size(1);
  at::Tensor out = empty_large({num_rows, h}, grad_y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, out.scalar_type(), "unpermute_backward", [&] {
        using acc_t = acc_of<scalar_t>;
        const scalar_t* g = grad_y.data_ptr<scalar_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        // Written in row order (as permute's gather: sequential stores and page faults).
        at::parallel_for(0, num_rows, kTokenGrain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* row = dst + r * h;
            const int32_t i = r < mapped ? slot_of[r] : -1;
            if (i < 0) {
              std::fill(row, row + h, scalar_t(0));
              continue;
            }
            scale_row(row, g + (i / k) * h, weight_at<acc_t>(w, i), h);
          }
        });
      });
  return out;
}

at::Tensor unpermute_weights_backward_cpu(const at::Tensor& grad_y_in,
                                          const at::Tensor& y_sorted_in,
                                          const at::Tensor& row_map_in, const at::Tensor& weights) {
  unpermute_weights_backward_check(grad_y_in, y_sorted_in, row_map_in, weights);
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor y_sorted = y_sorted_in.stride(1) == 1 ? y_sorted_in : y_sorted_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  unpermute_check_row_map_values(row_map, y_sorted.size(0), "unpermute_weights_backward");
  const int64_t t = row_map.size(0), k = row_map.size(1), h = grad_y.size(1);
  at::Tensor gw = at::empty({t, k}, weights.options());
  const int32_t* rm = row_map.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad_y.scalar_type(), "unpermute_weights_backward", [&] {
        using acc_t = acc_of<scalar_t>;
        const scalar_t* g = grad_y.data_ptr<scalar_t>();
        const scalar_t* ys = y_sorted.data_ptr<scalar_t>();
        const int64_t ld = y_sorted.stride(0);
        std::vector<acc_t> dots(t * k);
        at::parallel_for(0, t, kTokenGrain, [&](int64_t t0, int64_t t1) {
          for (int64_t tok = t0; tok < t1; ++tok) {
            // The token's rows side by side, a block of columns at a time (as in unpermute).
            const scalar_t* a = g + tok * h;
            for (int64_t j0 = 0; j0 < k; j0 += kMaxGatherRows) {
              const int64_t n = std::min<int64_t>(kMaxGatherRows, k - j0);
              const scalar_t* rows[kMaxGatherRows];
              acc_t d[kMaxGatherRows];
              for (int64_t i = 0; i < n; ++i) {
                const int32_t r = rm[tok * k + j0 + i];
                rows[i] = r >= 0 ? ys + r * ld : nullptr;
                d[i] = 0;
              }
              for (int64_t c0 = 0; c0 < h; c0 += kColumnBlock) {
                const int64_t nc = std::min<int64_t>(kColumnBlock, h - c0);
                for (int64_t i = 0; i < n; ++i) {
                  if (!rows[i]) continue;
                  d[i] += dot_block(a + c0, rows[i] + c0, nc);
                }
              }
              for (int64_t i = 0; i < n; ++i) dots[tok * k + j0 + i] = d[i];
            }
          }
        });
        gw.copy_(at::from_blob(
            dots.data(), {t, k},
            at::TensorOptions().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat)));
      });
  return gw;
}

// Tasks of about 64 KiB of output each.
int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(bytes_per_item, 1));
}

at::Tensor rows_to_slots_cpu(const at::Tensor& rows_in, const at::Tensor& row_map_in,
                             int64_t num_heads) {
  rows_to_slots_check(rows_in, row_map_in, num_heads);
  const at::Tensor rows = rows_in.stride(1) == 1 ? rows_in : rows_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  unpermute_check_row_map_values(row_map, rows.size(0), "rows_to_slots");
  const int64_t t = row_map.size(0), k = row_map.size(1), d = rows.size(1) / num_heads;
  at::Tensor slots = empty_large({t, num_heads, k, d}, rows.options());
  const int64_t piece = d * rows.element_size(), ld = rows.stride(0) * rows.element_size();
  if (piece == 0) return slots;
  const uint8_t* src = static_cast<const uint8_t*>(rows.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(slots.data_ptr());
  const int32_t* rm = row_map.data_ptr<int32_t>();
  at::parallel_for(0, t, grain_for(num_heads * k * piece), [&](int64_t t0, int64_t t1) {
    uint8_t* out = dst + t0 * num_heads * k * piece;  // slots[t0], written in order
    for (int64_t tok = t0; tok < t1; ++tok) {
      for (int64_t h = 0; h < num_heads; ++h) {
        for (int64_t j = 0; j < k; ++j, out += piece) {
          const int32_t r = rm[tok * k + j];
          if (r < 0) {
            std::memset(out, 0, piece);
          } else {
            std::memcpy(out, src + r * ld + h * piece, piece);
          }
        }
      }
    }
  });
  return slots;
}

at::Tensor slots_to_rows_cpu(const at::Tensor& slots_in, const at::Tensor& row_map_in,
                             int64_t num_rows) {
  slots_to_rows_check(slots_in, row_map_in, num_rows);
  const at::Tensor slots = slots_in.stride(3) == 1 ? slots_in : slots_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const int64_t num_heads = slots.size(1), k = slots.size(2), es = slots.element_size();
  const int64_t piece = slots.size(3) * es, row_bytes = num_heads * piece;
  // The output first: an impossible num_rows fails here, with torch's allocation error; then the
  // inverse map, at most 4 bytes per output row (none for empty rows: only the value check).
  at::Tensor rows = empty_large({num_rows, num_heads * slots.size(3)}, slots.options());
  if (row_bytes == 0) {
    unpermute_check_row_map_values(row_map, num_rows, "slots_to_rows");
    return rows;
  }
  // row -> the slot mapped to it, or -1 (rows past slot_of.size() have none)
  const std::vector<int32_t> slot_of = row_map_inverse(row_map, num_rows, "slots_to_rows");
  const int64_t mapped = static_cast<int64_t>(slot_of.size());
  const uint8_t* src = static_cast<const uint8_t*>(slots.data_ptr());
  uint8_t* dst = static_cast<uint8_t*>(rows.data_ptr());
  const int64_t st = slots.stride(0) * es, sh = slots.stride(1) * es, sj = slots.stride(2) * es;
  // Written in row order (as unpermute_backward: sequential stores and page faults).
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* out = dst + r * row_bytes;
      const int64_t i = r < mapped ? slot_of[r] : -1;
      if (i < 0) {
        std::memset(out, 0, row_bytes);
        continue;
      }
      const uint8_t* slot = src + (i / k) * st + (i % k) * sj;
      for (int64_t h = 0; h < num_heads; ++h) std::memcpy(out + h * piece, slot + h * sh, piece);
    }
  });
  return rows;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
  m.impl("unpermute_weights_backward", &unpermute_weights_backward_cpu);
  m.impl("rows_to_slots", &rows_to_slots_cpu);
  m.impl("slots_to_rows", &slots_to_rows_cpu);
}

}  // namespace mixops
