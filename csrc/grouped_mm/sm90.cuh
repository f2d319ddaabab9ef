// grouped_mm, SM90 path: the CUTLASS 3 template behind detail::GroupedGemm<dtype, A, B>. Included
// only by the six gemm_<dtype>_<ab>_sm90.cu files (one explicit instantiation each, so the
// heavy CUTLASS compiles run in parallel); built for sm_90a only.
//
// Kernel: pointer-array grouped GEMM (CUTLASS example 57): TMA loads, GMMA, warp-specialised
// cooperative schedule, per-group problem shapes / pointers / strides read from device memory, so
// nothing about offsets is ever known on the host. The device kernel of args_kernel.cuh builds
// those
// arrays from params.offsets right before the GEMM on the same stream (CUDA-graph capturable: no
// sync, no
// allocation, no host read of device memory).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <bit>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "core/align.h"
#include "core/cuda_launch.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_mm/args_kernel.cuh"
#include "grouped_mm/sm90.h"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "grouped_mm SM90 kernels need CUDA >= 12.3 (device-side TMA descriptor updates)"
#endif

namespace mixops::cuda::sm90::detail {

template <Dtype>
struct CutlassElement;
template <>
struct CutlassElement<Dtype::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CutlassElement<Dtype::kFloat16> {
  using type = cutlass::half_t;
};

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
      cutlass::epilogue::collective::EpilogueTileAuto, Accum, Accum, void, LayoutD*, kAlign,
      Element, LayoutD*, kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, Accum>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, Accum, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;  // one int64 mode each, the rest static
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The argument builder (args_kernel.cuh) writes plain int32 shapes and int64 leading dimensions;
// the GEMM reads them as its Shape and CuTe strides. That is sound only for this memory layout:
template <class Cfg>
struct ArgsLayoutCheck {
  template <class Stride>
  static constexpr Stride ld_stride(int64_t ld) {  // the one dynamic (int64) mode set to ld
    Stride s{};
    if constexpr (std::is_same_v<std::remove_cvref_t<decltype(cute::get<0>(s))>, int64_t>) {
      cute::get<0>(s) = ld;
    } else {
      cute::get<1>(s) = ld;
    }
    return s;
  }
  static_assert(sizeof(typename Cfg::Shape) == 3 * sizeof(int32_t) &&
                    std::bit_cast<std::array<int32_t, 3>>(typename Cfg::Shape{1, 2, 3}) ==
                        std::array<int32_t, 3>{1, 2, 3},
                "Shape must be (int m, int n, int k) in that order");
  static_assert(sizeof(typename Cfg::StrideA) == sizeof(int64_t) &&
                    std::bit_cast<int64_t>(ld_stride<typename Cfg::StrideA>(12345)) == 12345,
                "StrideA must be exactly its int64 leading dimension");
  static_assert(sizeof(typename Cfg::StrideB) == sizeof(int64_t) &&
                    std::bit_cast<int64_t>(ld_stride<typename Cfg::StrideB>(12345)) == 12345,
                "StrideB must be exactly its int64 leading dimension");
  static_assert(sizeof(typename Cfg::StrideD) == sizeof(int64_t) &&
                    std::bit_cast<int64_t>(ld_stride<typename Cfg::StrideD>(12345)) == 12345,
                "StrideD must be exactly its int64 leading dimension");
  static constexpr bool ok = true;
};

// The per-group arrays the GEMM reads, over the builder's output.
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
  size_t shapes, ptr_a, ptr_b, ptr_d, ld_a, ld_b, ld_d, cutlass, total;
};

inline Plan make_plan(int32_t groups, size_t cutlass_bytes) {
  const size_t e = groups > 0 ? static_cast<size_t>(groups) : 0;
  WorkspacePlan w;
  Plan plan{};
  plan.shapes = w.take(e * 3 * sizeof(int32_t));
  plan.ptr_a = w.take(e * sizeof(void*));
  plan.ptr_b = w.take(e * sizeof(void*));
  plan.ptr_d = w.take(e * sizeof(void*));
  plan.ld_a = w.take(e * sizeof(int64_t));
  plan.ld_b = w.take(e * sizeof(int64_t));
  plan.ld_d = w.take(e * sizeof(int64_t));
  plan.cutlass = w.take(cutlass_bytes);
  plan.total = w.total;
  return plan;
}

inline int sm_count_of(const LaunchConfig& cfg) {
  if (cfg.num_sms > 0) return cfg.num_sms;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms <= 0) {
    throw std::runtime_error("grouped_mm sm90: cannot query the multiprocessor count");
  }
  return sms;
}

// Arguments over the device arrays in `w` (also used, with a null base, just to size CUTLASS's
// workspace: get_workspace_size reads only hw_info.sm_count here).
template <class Cfg, class Element>
typename Cfg::Gemm::Arguments make_arguments(const GroupedMmParams& p,
                                             const DeviceArgs<Cfg, Element>& d, int sm_count,
                                             int device_id) {
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
  const auto args =
      make_arguments<Cfg, Element>(p, DeviceArgs<Cfg, Element>{}, sm_count_of(cfg), 0);
  return make_plan(p.num_groups, Cfg::Gemm::get_workspace_size(args)).total;
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

  // CUTLASS's workspace is the plan's last buffer, so its offset does not depend on its size
  // (workspace_bytes sized it, once per call): no second get_workspace_size here.
  static_assert(ArgsLayoutCheck<Cfg>::ok);
  const Plan w = make_plan(p.num_groups, 0);
  auto* base = static_cast<uint8_t*>(workspace);
  const GroupArgs<Element, Element, Element> built{
      reinterpret_cast<int32_t*>(base + w.shapes), reinterpret_cast<Element**>(base + w.ptr_a),
      reinterpret_cast<Element**>(base + w.ptr_b), reinterpret_cast<Element**>(base + w.ptr_d),
      reinterpret_cast<int64_t*>(base + w.ld_a),   reinterpret_cast<int64_t*>(base + w.ld_b),
      reinterpret_cast<int64_t*>(base + w.ld_d)};
  DeviceArgs<Cfg, Element> d;
  d.shapes = reinterpret_cast<typename Cfg::Shape*>(built.shapes);
  d.ptr_a = const_cast<const Element**>(built.ptr_a);
  d.ptr_b = const_cast<const Element**>(built.ptr_b);
  d.ptr_d = built.ptr_d;
  d.stride_a = reinterpret_cast<typename Cfg::StrideA*>(built.ld_a);
  d.stride_b = reinterpret_cast<typename Cfg::StrideB*>(built.ld_b);
  d.stride_d = reinterpret_cast<typename Cfg::StrideD*>(built.ld_d);

  const unsigned blocks =
      static_cast<unsigned>((p.num_groups + kBuildArgsThreads - 1) / kBuildArgsThreads);
  launch_kernel(&build_group_args<Element, Element, Element, GroupAlignRule::kTma, Cfg>, blocks,
                kBuildArgsThreads, 0, cfg.stream, p, built);
  check_launch("grouped_mm", "sm90 argument-builder launch");

  const auto args = make_arguments<Cfg, Element>(p, d, sms, device_id);
  cutlass::Status st = Gemm::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("grouped_mm sm90: CUTLASS can_implement failed: ") +
                             cutlass::cutlassGetStatusString(st));
  }
  // What GemmUniversalAdapter::initialize() does, except the shared-memory attribute, which is set
  // once per device instead of on every call: the workspace (nothing to enqueue for this scheduler
  // and epilogue), then the kernel params (host-side TMA descriptor templates).
  using Kernel = typename Gemm::GemmKernel;
  st = Kernel::initialize_workspace(args, base + w.cutlass, cfg.stream);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("grouped_mm sm90: CUTLASS initialize_workspace failed: ") +
                             cutlass::cutlassGetStatusString(st));
  }
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, base + w.cutlass);
  allow_dynamic_smem_once<&cutlass::device_kernel<Kernel>, Kernel::SharedStorageSize>(
      "grouped_mm", "CUTLASS sm90 grouped GEMM tile");
  st = Gemm::run(params, cfg.stream);
  if (st != cutlass::Status::kSuccess) {
    const cudaError_t e = cudaGetLastError();
    throw std::runtime_error(std::string("grouped_mm sm90: CUTLASS ") +
                             cutlass::cutlassGetStatusString(st) + " (" + cudaGetErrorString(e) +
                             ")");
  }
}

}  // namespace mixops::cuda::sm90::detail
