// grouped_mm, SM90 path: the CUTLASS 3 template behind detail::GroupedGemm<dtype, A, B>. Included
// only by the six grouped_mm_<dtype>_<ab>_sm90.cu files (one explicit instantiation each, so the
// heavy CUTLASS compiles run in parallel); built for sm_90a only.
//
// Kernel: pointer-array grouped GEMM (CUTLASS example 57): TMA loads, GMMA, warp-specialised
// cooperative schedule, per-group problem shapes / pointers / strides read from device memory, so
// nothing about offsets is ever known on the host. A small device kernel builds those arrays from
// params.offsets right before the GEMM on the same stream (CUDA-graph capturable: no sync, no
// allocation, no host read of device memory).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_mm_sm90.h"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "grouped_mm SM90 kernels need CUDA >= 12.3 (device-side TMA descriptor updates)"
#endif

namespace mixops::cuda::sm90::detail {

template <Dtype> struct CutlassElement;
template <> struct CutlassElement<Dtype::kBFloat16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<Dtype::kFloat16> { using type = cutlass::half_t; };

template <Layout L>
using CutlassLayout = cute::conditional_t<L == Layout::kRowMajor, cutlass::layout::RowMajor,
                                          cutlass::layout::ColumnMajor>;

// Cooperative: both consumer warp groups share one 128x128 tile (64x128 each), which keeps the
// accumulator at 64 fp32 registers per thread and the tile count per group low. Cluster 1x1x1:
// groups are ragged along M, and a 2x1 cluster would round every group's M tiles up to even
// (up to a whole wasted tile per group) for a small multicast saving on B.
template <class Element, class LayoutA, class LayoutB>
struct Config {
  using Accum = float;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // elements per 16 bytes, TMA's minimum
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;

  // D = 1 * acc (no C source: ElementC = void, beta = 0), stored by TMA in Element.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accum, Accum,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign,
      cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, Accum>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, Accum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;  // one int64 mode each, the rest static
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The per-group arrays the argument builder writes and the GEMM reads.
template <class Cfg, class Element>
struct DeviceArgs {
  typename Cfg::Shape* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
};

// Workspace carve-up, host arithmetic only; every sub-buffer 256-byte aligned.
struct Plan {
  size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass, total;
};

inline size_t align256(size_t v) { return (v + 255) / 256 * 256; }

template <class Cfg>
Plan make_plan(int32_t groups, size_t cutlass_bytes) {
  const size_t e = groups > 0 ? static_cast<size_t>(groups) : 0;
  Plan w{};
  size_t at = 0;
  auto take = [&at](size_t bytes) { const size_t here = at; at = align256(at + bytes); return here; };
  w.shapes = take(e * sizeof(typename Cfg::Shape));
  w.ptr_a = take(e * sizeof(void*));
  w.ptr_b = take(e * sizeof(void*));
  w.ptr_d = take(e * sizeof(void*));
  w.stride_a = take(e * sizeof(typename Cfg::StrideA));
  w.stride_b = take(e * sizeof(typename Cfg::StrideB));
  w.stride_d = take(e * sizeof(typename Cfg::StrideD));
  w.cutlass = take(cutlass_bytes);
  w.total = at;
  return w;
}

// A CuTe stride with exactly one dynamic (int64) mode among its first two: set it to ld.
template <class Stride>
__device__ __forceinline__ Stride ld_stride(int64_t ld) {
  Stride s{};
  if constexpr (std::is_same_v<std::remove_cvref_t<decltype(cute::get<0>(s))>, int64_t>) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  return s;
}

// One thread per group: shape, pointers and strides from the clamped offsets. Strides are the
// real leading dimensions (a ragged_k operand is a slice of a wider matrix), never packed ones.
template <class Cfg, class Element>
__global__ void __launch_bounds__(128) build_group_args(GroupedMmParams p,
                                                        DeviceArgs<Cfg, Element> out) {
  const int32_t g = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x);
  if (g >= p.num_groups) return;
  int32_t err = 0;
  const GroupProblem q = grouped_mm_group_problem(p, g, &err);
  if (err != 0 && p.error_flag != nullptr) atomicOr(p.error_flag, err);
  // M = 0 gives a group no tiles. Needed for empty groups (CUTLASS would store an unzeroed
  // accumulator when K = 0; the zero-fill kernel owns those outputs) and for groups whose start is
  // not 16-byte aligned (TMA cannot load them; the rescue kernel in run() computes them).
  const bool skip = q.gm == 0 || q.gn == 0 || q.gk == 0 || !group_tma_aligned(q);
  out.shapes[g] = typename Cfg::Shape{skip ? 0 : static_cast<int>(q.gm), static_cast<int>(q.gn),
                                      static_cast<int>(q.gk)};
  out.ptr_a[g] = static_cast<const Element*>(p.a) + q.a_offset;
  out.ptr_b[g] = static_cast<const Element*>(p.b) + q.b_offset;
  out.ptr_d[g] = static_cast<Element*>(p.out) + q.out_offset;
  out.stride_a[g] = ld_stride<typename Cfg::StrideA>(grouped_mm_lda(p));
  out.stride_b[g] = ld_stride<typename Cfg::StrideB>(grouped_mm_ldb(p));
  out.stride_d[g] = ld_stride<typename Cfg::StrideD>(p.out_stride_m);
}

inline int sm_count_of(const LaunchConfig& cfg) {
  if (cfg.num_sms > 0) return cfg.num_sms;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    throw std::runtime_error("grouped_mm sm90: cannot query the multiprocessor count");
  }
  return sms;
}

// Arguments over the device arrays in `w` (also used, with a null base, just to size CUTLASS's
// workspace: get_workspace_size reads only hw_info.sm_count here).
template <class Cfg, class Element>
typename Cfg::Gemm::Arguments make_arguments(const GroupedMmParams& p, const DeviceArgs<Cfg, Element>& d,
                                             int sm_count, int device_id) {
  typename Cfg::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {p.num_groups, d.shapes, nullptr};  // shapes on the device only
  args.mainloop = {d.ptr_a, d.stride_a, d.ptr_b, d.stride_b};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = d.stride_d;  // never read: no source (void C)
  args.epilogue.ptr_D = d.ptr_d;
  args.epilogue.dD = d.stride_d;
  args.hw_info.device_id = device_id;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <Dtype kDtype, Layout kLayoutA, Layout kLayoutB>
size_t GroupedGemm<kDtype, kLayoutA, kLayoutB>::workspace_bytes(const GroupedMmParams& p,
                                                                const LaunchConfig& cfg) {
  using Element = typename CutlassElement<kDtype>::type;
  using Cfg = Config<Element, CutlassLayout<kLayoutA>, CutlassLayout<kLayoutB>>;
  const auto args = make_arguments<Cfg, Element>(p, DeviceArgs<Cfg, Element>{}, sm_count_of(cfg), 0);
  return make_plan<Cfg>(p.num_groups, Cfg::Gemm::get_workspace_size(args)).total;
}

template <Dtype kDtype, Layout kLayoutA, Layout kLayoutB>
void GroupedGemm<kDtype, kLayoutA, kLayoutB>::run(const GroupedMmParams& p, void* workspace,
                                                  const LaunchConfig& cfg) {
  using Element = typename CutlassElement<kDtype>::type;
  using Cfg = Config<Element, CutlassLayout<kLayoutA>, CutlassLayout<kLayoutB>>;
  using Gemm = typename Cfg::Gemm;
  if (p.num_groups <= 0) return;
  const int sms = sm_count_of(cfg);
  int device_id = 0;
  if (cudaGetDevice(&device_id) != cudaSuccess) {
    throw std::runtime_error("grouped_mm sm90: cudaGetDevice failed");
  }

  // Same sizing as workspace_bytes (same sm count), so the caller's buffer fits this plan.
  const size_t cutlass_bytes =
      Gemm::get_workspace_size(make_arguments<Cfg, Element>(p, DeviceArgs<Cfg, Element>{}, sms, device_id));
  const Plan w = make_plan<Cfg>(p.num_groups, cutlass_bytes);
  auto* base = static_cast<uint8_t*>(workspace);
  DeviceArgs<Cfg, Element> d;
  d.shapes = reinterpret_cast<typename Cfg::Shape*>(base + w.shapes);
  d.ptr_a = reinterpret_cast<const Element**>(base + w.ptr_a);
  d.ptr_b = reinterpret_cast<const Element**>(base + w.ptr_b);
  d.ptr_d = reinterpret_cast<Element**>(base + w.ptr_d);
  d.stride_a = reinterpret_cast<typename Cfg::StrideA*>(base + w.stride_a);
  d.stride_b = reinterpret_cast<typename Cfg::StrideB*>(base + w.stride_b);
  d.stride_d = reinterpret_cast<typename Cfg::StrideD*>(base + w.stride_d);

  const unsigned blocks = static_cast<unsigned>((p.num_groups + 127) / 128);
  build_group_args<Cfg, Element><<<blocks, 128, 0, cfg.stream>>>(p, d);
  const cudaError_t launch = cudaGetLastError();
  if (launch != cudaSuccess) {
    throw std::runtime_error(std::string("grouped_mm sm90: argument builder launch failed: ") +
                             cudaGetErrorString(launch));
  }

  const auto args = make_arguments<Cfg, Element>(p, d, sms, device_id);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("grouped_mm sm90: CUTLASS can_implement failed: ") +
                             cutlass::cutlassGetStatusString(st));
  }
  // initialize: host-side TMA descriptor templates + cudaFuncSetAttribute (smem size); the grouped
  // scheduler and this epilogue need no workspace initialisation, so nothing is enqueued here.
  st = gemm.initialize(args, base + w.cutlass, cfg.stream);
  if (st == cutlass::Status::kSuccess) st = gemm.run(cfg.stream);
  if (st != cutlass::Status::kSuccess) {
    const cudaError_t e = cudaGetLastError();
    throw std::runtime_error(std::string("grouped_mm sm90: CUTLASS ") + cutlass::cutlassGetStatusString(st) +
                             " (" + cudaGetErrorString(e) + ")");
  }
}

}  // namespace mixops::cuda::sm90::detail
