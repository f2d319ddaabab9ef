// gated_activation and its backward on CPU: one pass over the gate and up rows, the two halves of
// [rows, 2F] (fused), its even and odd columns (interleaved) or two [rows, F] tensors (split) with
// one row stride (the per-element math is
// csrc/activation/activation.h, shared with CUDA). Rows in parallel; the column loops are written
// per activation so they vectorise (silu, relu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "activation/activation.h"
#include "activation/check.h"
#include "core/cpu_alloc.h"
#include "core/elem_io.h"

namespace mixops {
namespace {

constexpr int64_t kGrainElems = 1 << 14;  // elements of out per parallel task, at least

int64_t grain_rows(int64_t f) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(f, 1));
}

// The row loops, compiled for AVX2 and for the baseline (MIXOPS_CPU_CLONES, core/elem_io.h): without
// AVX2 these loops ran at half the speed of torch's silu.
// S: the distance between a row's consecutive gate (and up, d gate, d up) elements, 1 (fused and
// split) or 2 (interleaved: up = gate + 1, d up = d gate + 1).
template <GatedAct A, int S, class T>
MIXOPS_CPU_CLONES void forward_row(const T* __restrict__ gate, const T* __restrict__ up,
                                   T* __restrict__ o, int64_t f) {
  using acc_t = acc_of<T>;
  for (int64_t c = 0; c < f; ++c) {
    store(o, c, act::value<A, acc_t>(load(gate, S * c)) * load(up, S * c));
  }
}

template <GatedAct A, int S, class T>
MIXOPS_CPU_CLONES void backward_row(const T* __restrict__ gate, const T* __restrict__ up,
                                    const T* __restrict__ g, T* __restrict__ dgate,
                                    T* __restrict__ dup, int64_t f) {
  using acc_t = acc_of<T>;
  for (int64_t c = 0; c < f; ++c) {
    acc_t v, d;
    act::value_and_grad<A, acc_t>(load(gate, S * c), v, d);
    const acc_t go = load(g, c);
    store(dgate, S * c, go * load(up, S * c) * d);
    store(dup, S * c, go * v);
  }
}

// gate and up rows r at gate + r * ld and up + r * ld; out [rows, f] contiguous.
template <GatedAct A, int S, class T>
void forward_rows(const T* gate, const T* up, int64_t ld, T* out, int64_t rows, int64_t f) {
  at::parallel_for(0, rows, grain_rows(f), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      forward_row<A, S>(gate + r * ld, up + r * ld, out + r * f, f);
    }
  });
}

// grad [rows, f] contiguous -> dh [rows, 2f] contiguous: d gate, then d up, in each row (S = 1),
// or interleaved (S = 2).
template <GatedAct A, int S, class T>
void backward_rows(const T* grad, const T* gate, const T* up, int64_t ld, T* dh, int64_t rows,
                   int64_t f) {
  at::parallel_for(0, rows, grain_rows(f), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* dgate = dh + r * 2 * f;
      T* dup = S == 2 ? dgate + 1 : dgate + f;
      backward_row<A, S>(gate + r * ld, up + r * ld, grad + r * f, dgate, dup, f);
    }
  });
}

// The up rows: the split form's own tensor, the odd columns of each interleaved row, or the second
// half of each fused row.
template <class T>
const T* up_ptr(const GatedRows& g, bool interleaved) {
  if (g.up.defined()) return g.up.data_ptr<T>();
  return g.gate.data_ptr<T>() + (interleaved ? 1 : g.f);
}

// f(std::integral_constant<int, S>) for the element distance S of the form.
template <class F>
void with_stride(bool interleaved, const F& f) {
  if (interleaved) return f(std::integral_constant<int, 2>{});
  return f(std::integral_constant<int, 1>{});
}

template <class F>
void with_act(GatedAct a, const F& f) {
  switch (a) {
    case GatedAct::kSilu: return f(std::integral_constant<GatedAct, GatedAct::kSilu>{});
    case GatedAct::kGelu: return f(std::integral_constant<GatedAct, GatedAct::kGelu>{});
    case GatedAct::kGeluTanh: return f(std::integral_constant<GatedAct, GatedAct::kGeluTanh>{});
    case GatedAct::kRelu: return f(std::integral_constant<GatedAct, GatedAct::kRelu>{});
  }
}

// gate_up [..., 2F] (fused or interleaved) or the gate [..., F] with up [..., F] -> out [..., F].
at::Tensor gated_activation_cpu(const at::Tensor& gate_up_in, c10::string_view act_name,
                                const std::optional<at::Tensor>& up_in, bool interleaved) {
  const GatedAct a = gated_activation_check(gate_up_in, act_name, up_in, interleaved);
  const GatedRows g = gated_rows(gate_up_in, up_in);
  auto out_shape = gate_up_in.sizes().vec();
  out_shape.back() = g.f;
  at::Tensor out = empty_large(out_shape, gate_up_in.options());
  if (g.rows == 0 || g.f == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.gate.scalar_type(), "gated_activation", [&] {
        with_act(a, [&](auto A) {
          with_stride(interleaved, [&](auto S) {
            forward_rows<decltype(A)::value, decltype(S)::value>(
                g.gate.data_ptr<scalar_t>(), up_ptr<scalar_t>(g, interleaved), g.ld,
                out.data_ptr<scalar_t>(), g.rows, g.f);
          });
        });
      });
  return out;
}

// grad [..., F] -> d gate_up [..., 2F]: d gate in [..., :F], d up in [..., F:] (fused and split
// forms), or interleaved (the interleaved form).
at::Tensor gated_activation_backward_cpu(const at::Tensor& grad_in, const at::Tensor& gate_up_in,
                                         c10::string_view act_name,
                                         const std::optional<at::Tensor>& up_in, bool interleaved) {
  const GatedAct a =
      gated_activation_backward_check(grad_in, gate_up_in, act_name, up_in, interleaved);
  const GatedRows g = gated_rows(gate_up_in, up_in);
  const at::Tensor grad = grad_in.contiguous();
  auto dh_shape = grad_in.sizes().vec();
  dh_shape.back() = 2 * g.f;
  at::Tensor dh = empty_large(dh_shape, gate_up_in.options());
  if (g.rows == 0 || g.f == 0) return dh;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.gate.scalar_type(), "gated_activation_backward", [&] {
        with_act(a, [&](auto A) {
          with_stride(interleaved, [&](auto S) {
            backward_rows<decltype(A)::value, decltype(S)::value>(
                grad.data_ptr<scalar_t>(), g.gate.data_ptr<scalar_t>(),
                up_ptr<scalar_t>(g, interleaved), g.ld, dh.data_ptr<scalar_t>(), g.rows, g.f);
          });
        });
      });
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixops, CPU, m) {
  m.impl("gated_activation", &gated_activation_cpu);
  m.impl("gated_activation_backward", &gated_activation_backward_cpu);
}

}  // namespace mixops
