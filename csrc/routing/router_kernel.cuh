// router_topk on CUDA, device code (router.cu launches it; no launch syntax, no torch, no CUTLASS):
// the kernels behind launch.h (forward top-k with per-block statistic
// partials, the fixed-order reduction of those partials, and the backward).
//
// One warp routes one row at a time; a block holds 1..8 warps. A row's eligible experts
// i = 0..n-1 (expert lo + i) belong to lane i % 32, in ascending order, which is exactly the
// order det::canonical_sum prescribes: lane partials with det::add, then the xor butterfly. For
// n <= 512 a lane keeps its logits and keys in registers (VPT = values per lane, 1..16); above
// that (VPT = 0) logits are re-read from global memory (L1) and keys staged in shared memory.
// Every selection decision calls routing:: (key, group_score, choose_groups, better), so ids
// equal the CPU kernel's. Top-k: each lane tracks its best not-yet-chosen candidate; k rounds of
// a warp argmax under routing::better pick the winner, and only the winning lane rescans. A rule
// (top_p, cum_threshold, relu's positive logits) then keeps a prefix of the k (routing::kept_slots)
// and clears the rest (id -1, weight 0); the backward takes the slots before the trailing -1s.
//
// Determinism: rows map to (block, warp) from the params alone (never the device); each warp
// adds its rows' probabilities into its own shared array, the block sums its warps in order into
// workspace partials [num_blocks, E], and a second kernel sums those in block order. Counts go
// the same way (integers). No float atomics, no host synchronisation.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/acc_convert.cuh"
#include "core/det_math.h"
#include "core/macros.h"
#include "routing/routing.h"

namespace mixops::cuda::router {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;                 // warps (rows in flight) per block
constexpr int64_t kTargetBlocks = 1024;      // grid cap: bounds the partials' size
constexpr int64_t kDefaultSmem = 48 * 1024;  // warps per block shrink to stay under this
constexpr unsigned kFull = 0xffffffffu;
constexpr int kReduceParts = 16;  // block-range slices per expert in the partial reduction

// Minimum resident blocks per SM promised to ptxas: small-E kernels (the common case) keep 3-4
// blocks per SM; fp64 (gradcheck) and the large-E kernels take the registers they need.
template <class T, int VPT>
constexpr int min_blocks() {
  if (std::is_same_v<T, double> || VPT == 0 || VPT > 8) return 1;
  return VPT <= 2 ? 4 : 3;
}

// Launch shape, computed on the host from the params and the device's shared-memory opt-in (the
// same in workspace_bytes and launch). off[] are byte offsets of the regions inside one warp's
// scratch. The scratch is the block's dynamic shared memory, or, when one warp's regions do not fit
// in it (large E: ~14K experts in fp32 on A100), a slice of the workspace in global memory
// (global_stride bytes per block): the same code, another base pointer.
struct Plan {
  int vpt;    // logits per lane held in registers; 0 = generic path (n > 512)
  int warps;  // warps per block
  int64_t rows_per_block, num_blocks;
  int64_t off[6], per_warp, smem;
  int64_t global_stride;  // 0: scratch in shared memory
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t acc_bytes(Dtype d) { return d == Dtype::kFloat64 ? 8 : 4; }
inline int64_t eligible(const RouterOptions& o) {
  return o.num_modalities > 1 ? o.num_experts / o.num_modalities : o.num_experts;
}
inline int pick_vpt(int64_t n) {
  for (int v = 1; v <= 16; v *= 2)
    if (n <= kWarp * v) return v;
  return 0;
}

// Lays the per-warp regions out (16-byte aligned), then takes the most warps per block (up to 8,
// at least 1) whose shared memory stays under 48 KB. Each warp gets rpw rows, rpw the smallest
// that keeps the grid at kTargetBlocks blocks or fewer. Past max_smem (the device's opt-in) the
// scratch moves to global memory: one warp per block, at most kTargetBlocksGlobal blocks, so the
// workspace stays kTargetBlocksGlobal * (regions + block_bytes) bytes.
constexpr int64_t kTargetBlocksGlobal = 256;
inline Plan make_plan(int64_t T, int64_t n, std::initializer_list<int64_t> regions,
                      int64_t block_bytes, int64_t max_smem) {
  Plan pl{};
  pl.vpt = pick_vpt(n);
  int r = 0;
  for (int64_t bytes : regions) {
    pl.off[r++] = pl.per_warp;
    pl.per_warp += ceil_div(bytes, 16) * 16;
  }
  pl.warps = kMaxWarps;
  while (pl.warps > 1 && pl.warps * pl.per_warp + block_bytes > kDefaultSmem) pl.warps /= 2;
  pl.smem = pl.warps * pl.per_warp + block_bytes;
  int64_t target = kTargetBlocks;
  if (pl.smem > max_smem) {
    pl.vpt = 0;  // the generic path (it takes any n); the only one built with global scratch
    pl.warps = 1;
    pl.global_stride = ceil_div(pl.per_warp + block_bytes, 256) * 256;
    pl.smem = 0;
    target = kTargetBlocksGlobal;
  }
  pl.rows_per_block = std::max<int64_t>(1, ceil_div(T, pl.warps * target)) * pl.warps;
  pl.num_blocks = ceil_div(T, pl.rows_per_block);
  return pl;
}

// Forward regions per warp: keys [n] (generic path or groups), group scores [G], weights [k],
// ids [k], kept groups [G] (bool), probability sums [E]. Block: counts [E] int32 after the warps.
inline Plan fwd_plan(const RouterParams& p, int64_t max_smem) {
  const RouterOptions& o = p.opt;
  const int64_t a = acc_bytes(p.dtype), n = eligible(o), E = o.num_experts;
  const int64_t G = o.num_groups > 1 ? o.num_groups : 0;
  auto plan = [&](bool stage) {
    return make_plan(p.num_tokens, n, {stage ? n * a : 0, G * a, o.k * a, o.k * 4, G, E * a}, E * 4,
                     max_smem);
  };
  const Plan pl = plan(pick_vpt(n) == 0 || G > 0);
  // A global-memory plan runs the generic path, which stages the keys: give them their region.
  return pl.global_stride > 0 ? plan(true) : pl;
}

// Backward regions per warp: the chosen experts' gradient [n], raw weights [k], their grads [k].
inline Plan bwd_plan(const RouterBackwardParams& p, int64_t max_smem) {
  const int64_t a = acc_bytes(p.dtype), n = eligible(p.opt);
  return make_plan(p.num_tokens, n, {n * a, p.opt.k * a, p.opt.k * a}, 0, max_smem);
}

// Workspace: probability partials [num_blocks, E] acc_t, then count partials [num_blocks, E].
inline int64_t count_partials_offset(int64_t num_blocks, int64_t E, int64_t a) {
  return ceil_div(num_blocks * E * a, 256) * 256;
}

// ---- device helpers -----------------------------------------------------------------------

// The eligible range of row t; bad modality values are clamped and reported (lane 0).
__device__ __forceinline__ void row_range(const RouterOptions& o, const void* modality, bool m64,
                                          int64_t t, int32_t* error_flag, int lane, int* lo,
                                          int* hi) {
  int64_t m = 0;
  if (o.num_modalities > 1 && modality != nullptr)
    m = m64 ? static_cast<const int64_t*>(modality)[t] : static_cast<const int32_t*>(modality)[t];
  bool bad = false;
  routing::modality_range(o, m, lo, hi, &bad);
  if (bad && lane == 0 && error_flag != nullptr) atomicOr(error_flag, kModalityOutOfRange);
}

// One row's eligible logits as seen by one lane: i = lane + 32 j, held in registers (VPT > 0)
// or loaded on demand (VPT == 0). each(f) calls f(j, i) for the lane's i < n in ascending order.
template <class T, int VPT>
struct RowVals {
  using Acc = acc_t<T>;
  const T* row;  // logits of expert lo
  int n, lane;
  Acc xv[VPT > 0 ? VPT : 1];

  __device__ __forceinline__ RowVals(const T* r, int n_, int lane_) : row(r), n(n_), lane(lane_) {
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      xv[j] = lane + kWarp * j < n ? to_acc(row[lane + kWarp * j]) : Acc(0);
  }
  __device__ __forceinline__ Acc x(int j, int i) const {
    if constexpr (VPT > 0)
      return xv[j];
    else
      return to_acc(row[i]);
  }
  template <class F>
  __device__ __forceinline__ void each(F&& f) const {
    if constexpr (VPT > 0) {
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (lane + kWarp * j < n) f(j, lane + kWarp * j);
    } else {
      for (int i = lane; i < n; i += kWarp) f(0, i);
    }
  }
};

// det::canonical_sum's combine step on a warp (all lanes end with the same bits: add commutes).
template <class Acc>
__device__ __forceinline__ Acc canonical_butterfly(Acc v) {
#pragma unroll
  for (int h = kWarp / 2; h; h /= 2) v = det::add(v, __shfl_xor_sync(kFull, v, h));
  return v;
}

// Row max (routing::max_step in any order: lanes can differ only in the sign of a zero max,
// which no later result sees: exp(-0) = exp(+0)), the softmax denominator and, if asked, the
// sigmoid sum, both in det::canonical_sum order.
template <class T, int VPT, class Acc = acc_t<T>>
__device__ __forceinline__ void row_sums(const RowVals<T, VPT>& rv, bool want_sig, Acc* max,
                                         Acc* den, Acc* sig_den) {
  Acc m = -INFINITY, s = Acc(0), sg = Acc(0);
  rv.each([&](int j, int i) { m = routing::max_step(m, rv.x(j, i)); });
#pragma unroll
  for (int h = kWarp / 2; h; h /= 2) m = routing::max_step(m, __shfl_xor_sync(kFull, m, h));
  rv.each([&](int j, int i) { s = det::add(s, routing::softmax_num(rv.x(j, i), m)); });
  if (want_sig) {
    rv.each([&](int j, int i) { sg = det::add(sg, det::sigmoid(rv.x(j, i))); });
    sg = canonical_butterfly(sg);
  }
  *max = m;
  *den = canonical_butterfly(s);
  *sig_den = sg;
}

// ---- forward ------------------------------------------------------------------------------

// kGlobal: the plan put the scratch in global memory (large E); a template parameter so the
// common shared-memory kernels keep shared-memory addressing.
template <class T, int VPT, bool kGlobal = false>
__global__ void __launch_bounds__(kMaxWarps* kWarp, min_blocks<T, VPT>())
    router_fwd_kernel(const RouterParams p, const Plan pl, acc_t<T>* part_sum, int32_t* part_count,
                      unsigned char* global_scratch) {
  using Acc = acc_t<T>;
  MIXOPS_DYNAMIC_SMEM(unsigned char, dyn_smem);
  unsigned char* smem = dyn_smem;
  if constexpr (kGlobal) smem = global_scratch + blockIdx.x * pl.global_stride;
  const RouterOptions opt = p.opt;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  const int E = opt.num_experts, k = opt.k, G = opt.num_groups;
  const int gsize = G > 1 ? E / G : 1;
  unsigned char* mine = smem + warp * pl.per_warp;
  Acc* skeys = reinterpret_cast<Acc*>(mine + pl.off[0]);
  Acc* sgroup = reinterpret_cast<Acc*>(mine + pl.off[1]);
  Acc* sw = reinterpret_cast<Acc*>(mine + pl.off[2]);
  int32_t* sids = reinterpret_cast<int32_t*>(mine + pl.off[3]);
  bool* skeep = reinterpret_cast<bool*>(mine + pl.off[4]);
  Acc* sprob = reinterpret_cast<Acc*>(mine + pl.off[5]);
  int32_t* scount = reinterpret_cast<int32_t*>(smem + nw * pl.per_warp);
  for (int e = lane; e < E; e += kWarp) sprob[e] = Acc(0);
  for (int e = threadIdx.x; e < E; e += blockDim.x) scount[e] = 0;
  __syncthreads();

  const Acc* bias = static_cast<const Acc*>(p.bias);
  const bool stage = VPT == 0 || G > 1;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * pl.rows_per_block;
  const int64_t last = min(p.num_tokens, first + pl.rows_per_block);
  for (int64_t t = first + warp; t < last; t += nw) {
    int lo, hi;
    row_range(opt, p.modality, p.modality_int64, t, p.error_flag, lane, &lo, &hi);
    const RowVals<T, VPT> rv(static_cast<const T*>(p.logits) + t * p.logits_stride + lo, hi - lo,
                             lane);
    const bool counted = p.token_mask == nullptr || p.token_mask[t] != 0;
    Acc m, den, sig_den;
    row_sums(rv, counted && opt.score_fn == ScoreFn::kSigmoid, &m, &den, &sig_den);

    // Selection keys (registers and/or the warp's shared array).
    Acc kv[VPT > 0 ? VPT : 1];
    rv.each([&](int j, int i) {
      const Acc key = routing::key(opt, rv.x(j, i), opt.has_bias ? bias[lo + i] : Acc(0), m, den);
      if constexpr (VPT > 0) kv[j] = key;
      if (stage) skeys[i] = key;
    });
    // Group-limited selection: lanes score groups, lane 0 keeps the best (the shared functions).
    if (G > 1) {
      __syncwarp();
      for (int g = lane; g < G; g += kWarp)
        sgroup[g] = routing::group_score(opt.group_score, skeys + g * gsize, gsize);
      __syncwarp();
      if (lane == 0) routing::choose_groups(sgroup, G, opt.groups_kept, skeep);
      __syncwarp();
    }
    auto in_kept_group = [&](int i) { return G <= 1 || (i / gsize < G && skeep[i / gsize]); };
    unsigned cand = 0;  // VPT > 0: bit j set = value j is a candidate
    if constexpr (VPT > 0) rv.each([&](int j, int i) { cand |= unsigned(in_kept_group(i)) << j; });

    // Top-k: (bk, bid, bx) = this lane's best candidate not chosen yet. A lane rescans (first
    // round: all lanes) for the best candidate below the last winner when its own best won.
    Acc bk = Acc(0), bx = Acc(0), wk = Acc(0);
    int bid = -1, wid = -1;
    bool rescan = true;
    for (int r = 0; r < k; ++r) {
      if (rescan) {
        const bool bounded = r > 0;
        bid = -1;
        rv.each([&](int j, int i) {
          const bool ok = VPT > 0 ? ((cand >> j) & 1u) != 0 : in_kept_group(i);
          const Acc key = VPT > 0 ? kv[j] : skeys[i];
          const int id = lo + i;
          if (!ok || (bounded && !routing::better(wk, wid, key, id))) return;
          if (bid < 0 || routing::better(key, id, bk, bid)) {
            bk = key;
            bid = id;
            bx = rv.x(j, i);
          }
        });
      }
      wk = bk;  // warp argmax; all lanes end with the same winner (better is a strict order)
      wid = bid;
#pragma unroll
      for (int h = kWarp / 2; h; h /= 2) {
        const Acc ok = __shfl_xor_sync(kFull, wk, h);
        const int oid = __shfl_xor_sync(kFull, wid, h);
        if (oid >= 0 && (wid < 0 || routing::better(ok, oid, wk, wid))) {
          wk = ok;
          wid = oid;
        }
      }
      rescan = wid >= 0 && bid == wid;
      if (rescan) {  // the owner records the winner
        sids[r] = wid;
        sw[r] = opt.topk_then_score ? bx : routing::score(opt.score_fn, bx, m, den);
      } else if (wid < 0 && lane == 0) {  // fewer candidates than k (the op layer forbids it)
        sids[r] = -1;
        sw[r] = Acc(0);
      }
    }
    __syncwarp();
    if (lane == 0) {  // the CPU twin's steps: the rule keeps a prefix, the rest is no expert
      if (opt.topk_then_score) routing::score_chosen(opt.score_fn, sw, k);
      const int32_t kept = routing::kept_slots(opt, sw, k);
      routing::clear_slots(sw, sids, kept, k);
      routing::finish_weights(opt, sw, kept);
      static_cast<Acc*>(p.lse)[t] = det::add(m, det::log(den));
    }
    __syncwarp();
    for (int j = lane; j < k; j += kWarp) {  // counts: the kept slots (cleared ones are id -1)
      static_cast<Acc*>(p.weights)[t * k + j] = sw[j];
      p.ids[t * k + j] = sids[j];
      if (counted && sids[j] >= 0) atomicAdd(&scount[sids[j]], 1);
    }
    if (counted)
      rv.each([&](int j, int i) {
        const Acc pr = routing::prob(opt.score_fn, rv.x(j, i), m, den, sig_den);
        sprob[lo + i] = det::add(sprob[lo + i], pr);
      });
    __syncwarp();  // the next row reuses this warp's shared arrays
  }
  __syncthreads();
  // This block's partials: its warps' sums in warp order.
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    Acc s = Acc(0);
    for (int w = 0; w < nw; ++w)
      s = det::add(s, reinterpret_cast<const Acc*>(smem + w * pl.per_warp + pl.off[5])[e]);
    part_sum[static_cast<int64_t>(blockIdx.x) * E + e] = s;
    part_count[static_cast<int64_t>(blockIdx.x) * E + e] = scount[e];
  }
}

// counts / score_sum = the partials summed in block order: 16 threads per expert take strided
// block slices, then one adds the 16 slice sums in slice order (fixed for given num_blocks, E).
template <class Acc>
__global__ void __launch_bounds__(kWarp* kReduceParts)
    router_stats_reduce_kernel(const Acc* part_sum, const int32_t* part_count, int64_t num_blocks,
                               int E, Acc* score_sum, int32_t* counts) {
  MIXOPS_STATIC_SMEM(Acc[kReduceParts][kWarp], ssum);
  MIXOPS_STATIC_SMEM(int32_t[kReduceParts][kWarp], scnt);
  const int ex = threadIdx.x, part = threadIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarp + ex;
  Acc s = Acc(0);
  int32_t c = 0;
  for (int64_t b = part; e < E && b < num_blocks; b += kReduceParts) {
    s = det::add(s, part_sum[b * E + e]);
    c += part_count[b * E + e];
  }
  ssum[part][ex] = s;
  scnt[part][ex] = c;
  __syncthreads();
  if (part != 0 || e >= E) return;
  for (int q = 1; q < kReduceParts; ++q) {
    s = det::add(s, ssum[q][ex]);
    c += scnt[q][ex];
  }
  score_sum[e] = s;
  counts[e] = c;
}

// ---- backward -----------------------------------------------------------------------------

template <class T, int VPT, bool kGlobal = false>
__global__ void __launch_bounds__(kMaxWarps* kWarp, min_blocks<T, VPT>())
    router_bwd_kernel(const RouterBackwardParams p, const Plan pl, unsigned char* global_scratch) {
  using Acc = acc_t<T>;
  MIXOPS_DYNAMIC_SMEM(unsigned char, dyn_smem);
  unsigned char* smem = dyn_smem;
  if constexpr (kGlobal) smem = global_scratch + blockIdx.x * pl.global_stride;
  const RouterOptions opt = p.opt;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nw = blockDim.x / kWarp;
  const int E = opt.num_experts, k = opt.k;
  unsigned char* mine = smem + warp * pl.per_warp;
  Acc* cw = reinterpret_cast<Acc*>(mine + pl.off[0]);  // the chosen experts' gradient, by i
  Acc* sraw = reinterpret_cast<Acc*>(mine + pl.off[1]);
  Acc* sg = reinterpret_cast<Acc*>(mine + pl.off[2]);
  const Acc* gw = static_cast<const Acc*>(p.grad_weights);
  const Acc* gss = static_cast<const Acc*>(p.grad_score_sum);
  const Acc* glse = static_cast<const Acc*>(p.grad_lse);
  const ScoreFn f = opt.score_fn;
  const bool tts = opt.topk_then_score;
  // cw holds dL/ds pushed through the row softmax (soft_w: score-then-top-k softmax), dL/ds of
  // an elementwise score (sigmoid, none, relu), or dL/dx itself (top-k then score).
  const bool soft_w = gw != nullptr && !tts && f == ScoreFn::kSoftmax;

  const int64_t first = static_cast<int64_t>(blockIdx.x) * pl.rows_per_block;
  const int64_t last = min(p.num_tokens, first + pl.rows_per_block);
  for (int64_t t = first + warp; t < last; t += nw) {
    int lo, hi;
    row_range(opt, p.modality, p.modality_int64, t, p.error_flag, lane, &lo, &hi);
    const int n = hi - lo;
    const RowVals<T, VPT> rv(static_cast<const T*>(p.logits) + t * p.logits_stride + lo, n, lane);
    const bool use_g = gss != nullptr && (p.token_mask == nullptr || p.token_mask[t] != 0);
    // score_sum's probabilities: sigmoid over the row's sigmoid sum, relu(x), or softmax.
    const bool sig_g = use_g && f == ScoreFn::kSigmoid, relu_g = use_g && f == ScoreFn::kRelu;
    const bool soft_g = use_g && !sig_g && !relu_g;
    Acc m, den, sig_den;
    row_sums(rv, sig_g, &m, &den, &sig_den);
    auto softmax = [&](Acc x) { return det::div(routing::softmax_num(x, m), den); };

    for (int i = lane; i < n; i += kWarp) cw[i] = Acc(0);
    if (gw != nullptr) {  // dL/draw through finish_weights (and score_chosen for top-k then score)
      const int32_t* ids = p.ids + t * k;
      // kept: the slots before the trailing -1s (a rule's cleared slots: no expert, no gradient,
      // no error). The forward's kept prefix; the CPU twin raises where the two differ.
      int kept = 0;
      for (int j = lane; j < k; j += kWarp)
        if (ids[j] != -1) kept = j + 1;
#pragma unroll
      for (int h = kWarp / 2; h; h /= 2) kept = max(kept, __shfl_xor_sync(kFull, kept, h));
      for (int j = lane; j < k; j += kWarp) {
        // A kept slot that is not an eligible expert (a -1 included) is not from this forward:
        // flagged and ignored. A cleared slot's raw weight is 0, as on the CPU.
        const bool ok = j < kept && ids[j] >= lo && ids[j] < hi;
        if (j < kept && !ok && p.error_flag != nullptr) atomicOr(p.error_flag, kIdsNotEligible);
        const Acc x = ok ? to_acc(rv.row[ids[j] - lo]) : Acc(0);
        sraw[j] = tts || j >= kept ? x : routing::score(f, x, m, den);
        sg[j] = gw[t * k + j];
      }
      __syncwarp();
      if (lane == 0) {  // the CPU twin's steps, over the kept slots
        if (tts) routing::score_chosen(f, sraw, k);
        routing::finish_weights_backward(opt, sraw, sg, kept);
        if (tts) routing::score_chosen_backward(f, sraw, sg, kept);
        for (int j = 0; j < kept; ++j)  // one lane: safe even for repeated ids
          if (ids[j] >= lo && ids[j] < hi) cw[ids[j] - lo] += sg[j];
      }
      __syncwarp();
    }

    // Softmax-space gradient a (weights and/or softmax-probability stats): dx = s (a - <a, s>).
    // Sigmoid-probability stats: dx = (G - <G, p>) / S * sig (1 - sig).
    auto a_of = [&](int i) { return (soft_w ? cw[i] : Acc(0)) + (soft_g ? gss[lo + i] : Acc(0)); };
    Acc dot = Acc(0), dotp = Acc(0);
    rv.each([&](int j, int i) {
      if (soft_w || soft_g) dot += a_of(i) * softmax(rv.x(j, i));
      if (sig_g) dotp += gss[lo + i] * routing::prob(f, rv.x(j, i), m, den, sig_den);
    });
#pragma unroll
    for (int h = kWarp / 2; h; h /= 2) {
      dot += __shfl_xor_sync(kFull, dot, h);
      dotp += __shfl_xor_sync(kFull, dotp, h);
    }
    T* out = static_cast<T*>(p.grad_logits) + t * E;
    rv.each([&](int j, int i) {
      const Acc x = rv.x(j, i);
      Acc dx = Acc(0);
      if (soft_w || soft_g || glse != nullptr) {
        const Acc s = softmax(x);
        if (soft_w || soft_g) dx += s * (a_of(i) - dot);
        if (glse != nullptr) dx += glse[t] * s;
      }
      if (sig_g) {
        const Acc sig = det::sigmoid(x);
        dx += (gss[lo + i] - dotp) / sig_den * sig * (Acc(1) - sig);
      }
      if (relu_g && x > Acc(0)) dx += gss[lo + i];  // relu' = [x > 0] (NaN: 0, as on the CPU)
      // Chosen experts only; none and relu: identity (a kept relu slot has x > 0: relu' = 1).
      if (gw != nullptr && !soft_w && cw[i] != Acc(0)) {
        Acc c = cw[i];
        if (!tts && f == ScoreFn::kSigmoid) {
          const Acc sig = det::sigmoid(x);
          c = c * sig * (Acc(1) - sig);
        }
        dx += c;
      }
      out[lo + i] = from_acc<T>(dx);
    });
    for (int e = lane; n != E && e < E; e += kWarp)
      if (e < lo || e >= hi) out[e] = from_acc<T>(Acc(0));
    __syncwarp();  // the next row reuses cw / sraw / sg
  }
}

}  // namespace mixops::cuda::router
