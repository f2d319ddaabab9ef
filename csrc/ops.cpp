// Every mixops schema, one line of doc each. Backends register kernels in csrc/<family>/cpu.cpp and
// csrc/<family>/cuda.cpp; fakes (meta) and autograd live in python/mixops/ops/<family>.py, which
// the set_python_module call before each family's schemas names (torch checks the fake's module).
#include <torch/library.h>

#include "core/error_record.h"

TORCH_LIBRARY(mixops, m) {
  // Reads and clears the device error bits of every CUDA op (core/errors.h): one sync per device;
  // raises naming each op that met invalid values (offsets, ids, row_map, modality) since the
  // last check. Nothing to do for CPU ops (they raise at the call) or in CPU-only builds.
  m.def("check_errors() -> ()", &mixops::check_errors);

  m.set_python_module("mixops.ops.grouped_mm");
  // Grouped matrix product. a [m, k] rows grouped by expert x b [E, k, n] -> [m, n] (rows past
  // offsets[-1] are zero), or a [m, r] x b [r, n] grouped along r -> [E, m, n] (empty group: zero
  // block). offsets: int32 [E] cumulative group ends.
  m.def("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor");

  m.set_python_module("mixops.ops.grouped_mm_packed");
  // Grouped matrix product whose groups also differ in N or K (experts of different widths): group
  // g owns rows offsets[g-1]:offsets[g] of the ragged dimension and columns/rows ends[g-1]:ends[g]
  // (width w_g <= width) of a packed dimension of size total. mode "mn": a [m, k] x b [k, total]
  // -> [m, width]; "mk": a [m, width] x b [total, n] -> [m, n]; "km": a [width, r] x b [r, n]
  // -> [total, n]; "kn": a [m, r] x b [r, width] -> [m, total] (the table in
  // python/mixops/ops/grouped_mm_packed.py); what no group writes is zero.
  m.def(
      "grouped_mm_packed(Tensor a, Tensor b, Tensor offsets, Tensor ends, str mode, SymInt width, "
      "SymInt total) -> Tensor");

  m.set_python_module("mixops.ops.routing");
  // Fused scoring + top-k + renormalisation + per-expert statistics (csrc/routing/routing.h);
  // rule top_p / cum_threshold (threshold = p) or score_fn relu keep a prefix of the k best (a
  // variable number of experts per token; the other slots id -1, weight 0).
  // logits [T, E] -> weights [T, k] fp32 (fp64 for fp64 logits), ids [T, k] int32,
  // counts [E] int32, score_sum [E] (sum over tokens of the balancing-loss probability), lse [T].
  m.def(
      "router_topk(Tensor logits, int k, str score_fn=\"softmax\", bool topk_then_score=False, "
      "bool renormalize=True, float renorm_eps=0., float scaling=1., Tensor? bias=None, "
      "int num_groups=1, int groups_kept=1, str group_score=\"top2_sum\", "
      "Tensor? modality=None, int num_modalities=1, Tensor? token_mask=None, str rule=\"topk\", "
      "float threshold=0.) -> (Tensor weights, Tensor ids, Tensor counts, Tensor score_sum, "
      "Tensor lse)");
  // d logits [T, E] from d weights [T, k], d score_sum [E], d lse [T] (each optional); the ids
  // of the forward fix the selection.
  m.def(
      "router_topk_backward(Tensor? grad_weights, Tensor? grad_score_sum, Tensor? grad_lse, "
      "Tensor logits, Tensor ids, str score_fn, bool topk_then_score, bool renormalize, "
      "float renorm_eps, float scaling, Tensor? modality, int num_modalities, "
      "Tensor? token_mask) -> Tensor");
  // Top-C selection for Mixture-of-Depths / expert choice (csrc/routing/topc.h): scores [B, N],
  // mask [B, N] bool (True = eligible) -> values [B, c] (scores' dtype), indices [B, c] int64: the
  // c best eligible entries (router_topk's order) in ascending index order, then -1 / -inf.
  m.def("select_topc(Tensor scores, int c, Tensor? mask=None) -> (Tensor values, Tensor indices)");

  m.set_python_module("mixops.ops.permute");
  // Token dispatch (csrc/permute/permute.h). x [T, H], ids [T, k] int32/int64 (-1: none)
  // -> x_sorted [R, H] rows grouped by expert (stable), offsets [E] int32 cumulative ends,
  // row_map [T, k] int32 (row of each slot, -1 if none/dropped), dropped [E] int32.
  // R = T * k, or min(T * k, E * capacity) with a capacity.
  m.def(
      "permute(Tensor x, Tensor ids, int num_experts, SymInt? capacity=None, "
      "Tensor? priority=None) -> (Tensor x_sorted, Tensor offsets, Tensor row_map, "
      "Tensor dropped)");
  // Combine: y [T, H] = sum_j weights[t, j] * y_sorted[row_map[t, j]] (fp32 accumulation, no
  // atomics); weights [T, k] optional (ones). Also permute's backward (weights None).
  m.def("unpermute(Tensor y_sorted, Tensor row_map, Tensor? weights=None) -> Tensor");
  // d y_sorted [num_rows, H] = scatter of weights[t, j] * grad_y[t] to row_map[t, j]; rows no
  // slot maps to are zero.
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor row_map, Tensor? weights, SymInt num_rows) "
      "-> Tensor");
  // d weights [T, k] = <grad_y[t], y_sorted[row_map[t, j]]> (0 without a row), in weights' dtype.
  m.def(
      "unpermute_weights_backward(Tensor grad_y, Tensor y_sorted, Tensor row_map, "
      "Tensor weights) -> Tensor");
  // MoA slot layout (csrc/permute/permute.h): rows [R, heads * d] in permute's order -> slots
  // [T, heads, k, d], slots[t, h, j] = head h of row row_map[t, j] (zeros for -1).
  m.def("rows_to_slots(Tensor rows, Tensor row_map, int num_heads=1) -> Tensor");
  // Inverse and backward of rows_to_slots: slots [T, heads, k, d] -> rows [num_rows, heads * d];
  // rows no slot maps to are zero.
  m.def("slots_to_rows(Tensor slots, Tensor row_map, SymInt num_rows) -> Tensor");
  m.set_python_module("mixops.ops.permute_rows");
  // MoD's write-back (csrc/permute/permute.h): base [T, H] with row index[i] replaced by
  // rows[i] (index int32 [n], -1: none, others distinct); a fresh [T, H].
  m.def("scatter_rows(Tensor base, Tensor rows, Tensor index) -> Tensor");
  // Backward of scatter_rows: (grad_base [T, H]: grad with the written rows zeroed, grad_rows
  // [n, H] = grad[index] (zeros for -1)).
  m.def("scatter_rows_backward(Tensor grad, Tensor index) -> (Tensor, Tensor)");
  m.set_python_module("mixops.ops.permute_chunks");
  // Expert parallelism's regrouping (csrc/permute/permute.h): x [N, H] holds A * B chunks in
  // (a, b) order, chunk (a, b) counts[a, b] rows (counts int32 [A, B]) -> y [N, H] the same
  // chunks in (b, a) order, rows past sum(counts) zero. Its backward: counts.t().
  m.def("reorder_chunks(Tensor x, Tensor counts) -> Tensor");
  m.set_python_module("mixops.ops.activation");
  // Gated expert activation (csrc/activation/activation.h): gate_up [..., 2F] (gate columns first)
  // -> act(gate) * up [..., F]; with up, gate_up is the gate [..., F] and up [..., F] the up
  // projection (two GEMM outputs, no concatenation); interleaved: gate_up [..., 2F] holds g_0, u_0,
  // g_1, u_1, ... (GPT-OSS's layout; mixops' packed experts), up must be None; act: silu (SwiGLU),
  // gelu (GeGLU), gelu_tanh, relu (ReGLU).
  m.def(
      "gated_activation(Tensor gate_up, str activation=\"silu\", Tensor? up=None, "
      "bool interleaved=False) -> Tensor");
  // d gate_up [..., 2F] from d out [..., F] (recomputes act(gate)); with up, [..., :F] is d gate
  // and [..., F:] d up; interleaved: d gate at the even columns, d up at the odd ones.
  m.def(
      "gated_activation_backward(Tensor grad, Tensor gate_up, str activation, Tensor? up=None, "
      "bool interleaved=False) -> Tensor");
}
