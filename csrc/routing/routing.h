// router_topk: the options struct handed to the CPU and CUDA kernels and the per-row routing
// math both call (MIXOPS_HOST_DEVICE): selection keys, the tie rule, group limiting, weight
// finishing (renormalise, scale) and its backward. The CPU kernel walks a row sequentially; the
// CUDA kernel spreads a row over a warp but calls these same functions for every decision, so the
// CPU tests exercise the code the GPU runs. No torch here.
//
// One row (token) t, restricted to its eligible experts [lo, hi) (all E, or its modality's group):
//   scores   s_e = softmax(x)_e | sigmoid(x_e) | x_e            (score_fn, in acc_t: fp32 or fp64)
//   keys     what top-k ranks: x_e (+ bias_e) when that orders experts like the scores do
//            (keys_are_logits), else s_e + bias_e computed with det:: math (see det_math.h)
//   groups   (num_groups > 1) each group of E/num_groups experts scored by the sum of its top-2
//            keys, or its max; only the best groups_kept groups' experts are eligible
//   ids      the k best keys, best first; ties: the lower expert id wins; NaN keys rank last
//   weights  s_e of the chosen experts (score then top-k), or softmax/sigmoid/identity of their
//            logits (top-k then score); renormalised w / (sum w + eps) if asked; times scaling
//   stats    prob_e: the distribution the load-balancing loss uses: softmax over the row
//            (score_fn softmax or none), or the sigmoid scores divided by their row sum (sigmoid);
//            lse = max + log(sum exp(x - max)) over the row (the z-loss)
#pragma once

#include <cstdint>

#include "core/det_math.h"
#include "core/dtype.h"
#include "core/macros.h"

namespace mixops {

enum class ScoreFn : int32_t { kNone = 0, kSoftmax = 1, kSigmoid = 2, kRelu = 3 };
// How many of the k best a row keeps (a variable number of experts per token, static shapes: the
// slots past the kept prefix get id -1 and weight 0). kTopK: all k. kTopP ("Harder Tasks Need More
// Experts", ZhenweiAn/Dynamic_MoE): slot j if j == 0 or c_{j-1} <= p, c the inclusive prefix sums
// of the sorted softmax scores (the shortest prefix whose sum exceeds p). kCumThreshold (XMoE,
// ysngki/XMoE): slot j if j == 0 or fl(c_j - s_j) < p (the shortest prefix whose sum reaches p).
// kPositive (ReMoE, thu-ml/ReMoE; score_fn relu): the slots whose logit is > 0 (possibly none).
enum class Rule : int32_t { kTopK = 0, kTopP = 1, kCumThreshold = 2, kPositive = 3 };
enum class GroupScore : int32_t { kTop2Sum = 0, kMax = 1 };

// Bits of the CUDA error flag (value checks the host cannot make without a sync).
enum RouterError : int32_t {
  kModalityOutOfRange = 1,  // some modality[t] outside [0, num_modalities): row routed as group 0
  kIdsNotEligible = 2,      // backward: some ids[t, j] not an eligible expert of row t (ignored)
};

struct RouterOptions {
  int32_t num_experts = 0;  // E
  int32_t k = 1;            // topk, 1 <= k <= eligible experts
  ScoreFn score_fn = ScoreFn::kSoftmax;
  bool topk_then_score = false;  // rank logits, then score only the chosen k
  bool renormalize = true;
  double renorm_eps = 0.0;
  double scaling = 1.0;
  int32_t num_groups = 1;   // group-limited selection; 1 = off
  int32_t groups_kept = 1;  // groups left eligible when num_groups > 1
  GroupScore group_score = GroupScore::kTop2Sum;
  int32_t num_modalities = 1;  // experts split per modality; 1 = off
  bool has_bias = false;
  Rule rule = Rule::kTopK;  // kPositive exactly when score_fn is kRelu
  double threshold = 0.0;   // p of kTopP and kCumThreshold
};

namespace routing {

// Whether ranking raw logits (plus bias) orders experts exactly as the scores would.
// score then top-k with a bias, or with group scores that add two scores, needs the scores.
MIXOPS_INLINE bool keys_are_logits(const RouterOptions& o) {
  // relu keeps the logits' order among the positive ones, and only those are kept.
  if (o.topk_then_score || o.score_fn == ScoreFn::kNone || o.score_fn == ScoreFn::kRelu) {
    return true;
  }
  if (o.has_bias) return false;
  return o.num_groups == 1 || o.group_score == GroupScore::kMax;
}

// The strict total order of candidates: higher key first, NaN last, then the lower id.
template <class T>
MIXOPS_INLINE bool better(T key_a, int32_t id_a, T key_b, int32_t id_b) {
  if (key_a > key_b) return true;  // both numbers (the common cases first: one compare each)
  if (key_a < key_b) return false;
  const bool na = det::is_nan(key_a), nb = det::is_nan(key_b);  // equal, or a NaN
  if (na != nb) return nb;
  return id_a < id_b;
}

// Row maximum ignoring NaN (-inf for an empty or all-NaN row). Any order gives the same value.
template <class T>
MIXOPS_INLINE T max_step(T m, T x) {
  return x > m ? x : m;
}

// softmax numerator; row_max from max_step, the denominator from det::canonical_sum of these.
template <class T>
MIXOPS_INLINE T softmax_num(T x, T row_max) {
  return det::exp(det::sub(x, row_max));
}

// The score s_e of one logit. softmax needs the row's max and denominator.
// relu as torch.relu: NaN stays NaN.
template <class T>
MIXOPS_INLINE T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

template <class T>
MIXOPS_INLINE T score(ScoreFn f, T x, T row_max, T softmax_den) {
  if (f == ScoreFn::kSoftmax) return det::div(softmax_num(x, row_max), softmax_den);
  if (f == ScoreFn::kSigmoid) return det::sigmoid(x);
  if (f == ScoreFn::kRelu) return relu(x);
  return x;
}

// The selection key of one expert (bias = 0 when there is none).
template <class T>
MIXOPS_INLINE T key(const RouterOptions& o, T x, T bias, T row_max, T softmax_den) {
  const T base = keys_are_logits(o) ? x : score(o.score_fn, x, row_max, softmax_den);
  return o.has_bias ? det::add(base, bias) : base;
}

// The balancing-loss probability of one expert: softmax (score_fn softmax or none), the sigmoid
// score over the row's sigmoid sum, or relu(x) itself (relu: score_sum is then ReMoE's per-expert
// L1 mass sum_t relu(x_te)).
template <class T>
MIXOPS_INLINE T prob(ScoreFn f, T x, T row_max, T softmax_den, T sigmoid_den) {
  if (f == ScoreFn::kSigmoid) return det::div(det::sigmoid(x), sigmoid_den);
  if (f == ScoreFn::kRelu) return relu(x);
  return det::div(softmax_num(x, row_max), softmax_den);
}

// How many of the k best-first scores w[0..k) (before finish_weights) the row keeps, by o.rule;
// the kept slots are a prefix. Prefix sums run j = 0, 1, ... with det::add (the same bits on CPU
// and CUDA). kPositive keeps the scores > 0 (NaN is not > 0), so a row may keep none.
template <class T>
MIXOPS_INLINE int32_t kept_slots(const RouterOptions& o, const T* w, int32_t k) {
  const T p = static_cast<T>(o.threshold);
  T c = T(0);
  switch (o.rule) {
    case Rule::kTopP:
      for (int32_t j = 0; j < k; ++j) {
        if (j > 0 && !(c <= p)) return j;
        c = det::add(c, w[j]);
      }
      return k;
    case Rule::kCumThreshold:
      for (int32_t j = 0; j < k; ++j) {
        c = det::add(c, w[j]);
        if (j > 0 && !(det::sub(c, w[j]) < p)) return j;
      }
      return k;
    case Rule::kPositive:
      for (int32_t j = 0; j < k; ++j)
        if (!(w[j] > T(0))) return j;
      return k;
    default: return k;
  }
}

// Clears the slots [kept, k): id -1, weight 0 (no expert: no GEMM rows, no count).
template <class T>
MIXOPS_INLINE void clear_slots(T* w, int32_t* ids, int32_t kept, int32_t k) {
  for (int32_t j = kept; j < k; ++j) {
    w[j] = T(0);
    ids[j] = -1;
  }
}

// Inserts (key, id) into best-first lists keys/ids of length *count <= k (top-k by insertion).
template <class T>
MIXOPS_INLINE void topk_insert(T* keys, int32_t* ids, int32_t* count, int32_t k, T key_v,
                               int32_t id) {
  int32_t pos = *count;
  if (pos == k) {
    if (!better(key_v, id, keys[k - 1], ids[k - 1])) return;
    pos = k - 1;
  } else {
    ++*count;
  }
  while (pos > 0 && better(key_v, id, keys[pos - 1], ids[pos - 1])) {
    keys[pos] = keys[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  keys[pos] = key_v;
  ids[pos] = id;
}

// Score of one group from its keys[0..size): the sum of its two best keys (best + second, in
// that order), or its best key. A group of size 1 scores its only key.
template <class T>
MIXOPS_INLINE T group_score(GroupScore kind, const T* keys, int32_t size) {
  T top[2];
  int32_t ids[2];
  int32_t count = 0;
  const int32_t want = kind == GroupScore::kTop2Sum && size >= 2 ? 2 : 1;
  for (int32_t i = 0; i < size; ++i) topk_insert(top, ids, &count, want, keys[i], i);
  return want == 2 ? det::add(top[0], top[1]) : top[0];
}

// Marks the best `kept` of `num_groups` group scores (ties: lower group id) in keep[].
template <class T>
MIXOPS_INLINE void choose_groups(const T* scores, int32_t num_groups, int32_t kept, bool* keep) {
  for (int32_t g = 0; g < num_groups; ++g) keep[g] = false;
  for (int32_t r = 0; r < kept; ++r) {
    int32_t best = -1;
    for (int32_t g = 0; g < num_groups; ++g)
      if (!keep[g] && (best < 0 || better(scores[g], g, scores[best], best))) best = g;
    keep[best] = true;
  }
}

// top-k then score: w[0..k) holds the chosen logits on entry, their scores on exit (softmax over
// the k, or elementwise sigmoid/identity).
template <class T>
MIXOPS_INLINE void score_chosen(ScoreFn f, T* w, int32_t k) {
  if (f == ScoreFn::kSoftmax) {
    T m = -INFINITY;
    for (int32_t j = 0; j < k; ++j) m = max_step(m, w[j]);
    T den = T(0);
    for (int32_t j = 0; j < k; ++j) {
      w[j] = softmax_num(w[j], m);
      den = det::add(den, w[j]);
    }
    for (int32_t j = 0; j < k; ++j) w[j] = det::div(w[j], den);
  } else if (f == ScoreFn::kSigmoid) {
    for (int32_t j = 0; j < k; ++j) w[j] = det::sigmoid(w[j]);
  }
}

// Backward of score_chosen: g[0..k) holds dL/dw on entry, dL/dlogit on exit; s = its output.
template <class T>
MIXOPS_INLINE void score_chosen_backward(ScoreFn f, const T* s, T* g, int32_t k) {
  if (f == ScoreFn::kSoftmax) {
    T dot = T(0);
    for (int32_t j = 0; j < k; ++j) dot += g[j] * s[j];
    for (int32_t j = 0; j < k; ++j) g[j] = s[j] * (g[j] - dot);
  } else if (f == ScoreFn::kSigmoid) {
    for (int32_t j = 0; j < k; ++j) g[j] = g[j] * s[j] * (T(1) - s[j]);
  }
}

// Renormalise (if asked) and scale the k chosen weights in place, summing in order j = 0..k-1.
template <class T>
MIXOPS_INLINE void finish_weights(const RouterOptions& o, T* w, int32_t k) {
  if (o.renormalize) {
    T sum = T(0);
    for (int32_t j = 0; j < k; ++j) sum = det::add(sum, w[j]);
    const T den = det::add(sum, static_cast<T>(o.renorm_eps));
    for (int32_t j = 0; j < k; ++j) w[j] = det::div(w[j], den);
  }
  if (o.scaling != 1.0)
    for (int32_t j = 0; j < k; ++j) w[j] = det::mul(w[j], static_cast<T>(o.scaling));
}

// Backward of finish_weights: raw = the weights before finishing, g = dL/d(finished) on entry,
// dL/d(raw) on exit.
template <class T>
MIXOPS_INLINE void finish_weights_backward(const RouterOptions& o, const T* raw, T* g, int32_t k) {
  const T scale = static_cast<T>(o.scaling);
  for (int32_t j = 0; j < k; ++j) g[j] *= scale;
  if (o.renormalize) {
    T sum = T(0);
    for (int32_t j = 0; j < k; ++j) sum += raw[j];
    const T den = sum + static_cast<T>(o.renorm_eps);
    T dot = T(0);  // sum_j g_j * raw_j / den
    for (int32_t j = 0; j < k; ++j) dot += g[j] * raw[j];
    dot /= den;
    for (int32_t j = 0; j < k; ++j) g[j] = (g[j] - dot) / den;
  }
}

// The expert range [lo, hi) eligible for a row of modality m (all experts when num_modalities is
// 1). m out of range is clamped to 0 and reported through *bad.
MIXOPS_INLINE void modality_range(const RouterOptions& o, int64_t m, int32_t* lo, int32_t* hi,
                                  bool* bad) {
  if (o.num_modalities <= 1) {
    *lo = 0;
    *hi = o.num_experts;
    return;
  }
  if (m < 0 || m >= o.num_modalities) {
    *bad = true;
    m = 0;
  }
  const int32_t size = o.num_experts / o.num_modalities;
  *lo = static_cast<int32_t>(m) * size;
  *hi = *lo + size;
}

}  // namespace routing
}  // namespace mixops

namespace mixops {

// Tensors of one router_topk call, as raw pointers (contiguous unless a stride is given).
// acc_t is double for fp64 logits and float otherwise; weights, score_sum and lse are acc_t.
struct RouterParams {
  RouterOptions opt;
  Dtype dtype;         // of logits: fp32, bf16, fp16 or fp64
  int64_t num_tokens;  // T
  const void* logits;  // [T, E], row stride logits_stride, unit column stride
  int64_t logits_stride;
  const void* bias;      // [E] acc_t, nullable (opt.has_bias)
  const void* modality;  // [T] int32 or int64 (modality_int64), nullable (num_modalities > 1)
  bool modality_int64;
  const uint8_t* token_mask;  // [T] bool, nullable: stats count only tokens where it is true
  void* weights;              // [T, k] acc_t
  int32_t* ids;               // [T, k]
  int32_t* counts;            // [E] chosen (token, expert) pairs per expert, masked tokens excluded
  void* score_sum;            // [E] acc_t, sum over tokens of prob_e (routing::prob)
  void* lse;                  // [T] acc_t, logsumexp over the row's eligible experts
  int32_t* error_flag;        // nullable; CUDA: the op's device error slot (core/errors.h)
};

// router_topk_backward: dL/dlogits from dL/dweights, dL/dscore_sum and dL/dlse (each nullable =
// zero). The chosen ids fix the selection; everything else is recomputed from the logits.
struct RouterBackwardParams {
  RouterOptions opt;
  Dtype dtype;  // of logits and grad_logits
  int64_t num_tokens;
  const void* logits;  // [T, E], row stride logits_stride
  int64_t logits_stride;
  const void* modality;  // as in RouterParams
  bool modality_int64;
  const uint8_t* token_mask;
  const int32_t* ids;          // [T, k]
  const void* grad_weights;    // [T, k] acc_t, nullable
  const void* grad_score_sum;  // [E] acc_t, nullable
  const void* grad_lse;        // [T] acc_t, nullable
  void* grad_logits;           // [T, E] contiguous, logits' dtype
  int32_t* error_flag;
};

}  // namespace mixops
