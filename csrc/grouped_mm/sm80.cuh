// grouped_mm, CUTLASS 2 family: one template that runs every group of a grouped_mm as a single
// persistent cutlass::gemm::device::GemmGrouped launch (GroupScheduleMode::kDeviceOnly), after the
// device kernel that builds GemmGrouped's per-group argument arrays from params.offsets.
//
// Why it is shaped this way:
//  * offsets live in device memory and must not be read by the host (no sync, CUDA-graph
//    capturable), so problem sizes, pointers and leading dimensions are built ON THE DEVICE, and
//    the kDeviceOnly schedule is the one GemmGrouped mode that never needs host problem sizes;
//  * the persistent block count comes from occupancy x SM count (capped by a host-known upper
//    bound on the tile count), never from the real problem sizes;
//  * each (element, layout combo, tile config) is instantiated in its own .cu file
//    (gemm_*_sm80.cu) so the build compiles them in parallel.
// The argument builder is the CUTLASS-free kernel of args_kernel.cuh.
// Output is row-major, fp32 accumulation, D = 1 * A@B + 0 * C with C aliasing D (never read).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "core/cuda_launch.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/layout/matrix.h"
#include "grouped_mm/args_kernel.cuh"
#include "grouped_mm/grouped_mm.h"
#include "grouped_mm/sm80.h"

namespace mixops::cuda::sm80 {

using cutlass::gemm::GemmShape;

// ---- tile configurations (shapes as in CUTLASS examples 24 and 14 and the sm80 profiler set) ----

// bf16 / fp16 tensor ops: mma.sync 16x8x16, 4-stage cp.async pipeline, 128-bit accesses.
struct TensorOp16Config {
  using OperatorClass = cutlass::arch::OpClassTensorOp;
  using ThreadblockShape = GemmShape<128, 128, 32>;
  using WarpShape = GemmShape<64, 64, 32>;
  using InstructionShape = GemmShape<16, 8, 16>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 8;      // elements of A and B per access (16 bytes)
  static constexpr int kEpilogueCount = 8;  // elements of D per store (16 bytes)
};

// fp32 inputs on TF32 tensor ops (OpMultiplyAdd with float operands rounds to tf32).
struct Tf32Config {
  using OperatorClass = cutlass::arch::OpClassTensorOp;
  using ThreadblockShape = GemmShape<128, 128, 16>;
  using WarpShape = GemmShape<64, 64, 16>;
  using InstructionShape = GemmShape<16, 8, 8>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 4;
  static constexpr int kEpilogueCount = 4;
};

// fp32 exact: SIMT FFMA, scalar (alignment 1) cp.async loads, so any strides work.
struct SimtConfig {
  using OperatorClass = cutlass::arch::OpClassSimt;
  using ThreadblockShape = GemmShape<128, 128, 8>;
  using WarpShape = GemmShape<32, 64, 8>;
  using InstructionShape = GemmShape<1, 1, 1>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 1;
  static constexpr int kEpilogueCount = 1;  // the SIMT epilogue requires scalar stores
};

template <typename Element, typename LayoutA, typename LayoutB, typename Config>
struct GroupedGemm {
  using EpilogueOp =
      cutlass::epilogue::thread::LinearCombination<Element, Config::kEpilogueCount, float, float>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, Config::kAlignment,  //
      Element, LayoutB, cutlass::ComplexTransform::kNone, Config::kAlignment,  //
      Element, cutlass::layout::RowMajor, float,                               //
      typename Config::OperatorClass, cutlass::arch::Sm80,                     //
      typename Config::ThreadblockShape, typename Config::WarpShape,
      typename Config::InstructionShape, EpilogueOp,
      // Unused by grouped kernels (see example 24), but a template argument all the same.
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, Config::kStages,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly,
      cutlass::arch::OpMultiplyAdd>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

// ---- host helpers ----

inline void throw_on_status(cutlass::Status s, const char* what) {
  if (s == cutlass::Status::kSuccess) return;
  const cudaError_t e = cudaGetLastError();  // clears a pending launch/attribute error, if any
  throw std::runtime_error(std::string("mixops::grouped_mm: CUTLASS GemmGrouped ") + what +
                           " failed: " + cutlass::cutlassGetStatusString(s) +
                           " (last CUDA error: " + cudaGetErrorString(e) + ")");
}

// Resident blocks per SM for this kernel, queried once per device (occupancy queries and
// cudaFuncSetAttribute are not stream work, so this is safe under CUDA-graph capture).
template <typename Gemm>
int max_active_blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "grouped_mm", "cudaGetDevice");
  if (dev >= 0 && dev < kMaxDevices) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  const int blocks = Gemm::maximum_active_blocks();
  if (blocks <= 0) {
    throw std::runtime_error(
        "mixops::grouped_mm: CUTLASS GemmGrouped cannot be resident on this device "
        "(maximum_active_blocks <= 0; too much shared memory per block?)");
  }
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// Persistent grid size: one full wave, but never more blocks than the most tiles the groups can
// have, bounded from host-known sizes only (sum over groups of ceil(gm / TM) <= ceil(m / TM) + E).
template <typename Gemm>
int persistent_block_count(const GroupedMmParams& p, const LaunchConfig& cfg) {
  using TB = typename Gemm::ThreadblockShape;
  int sms = cfg.num_sms;
  if (sms <= 0) {
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "grouped_mm", "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "grouped_mm",
               "cudaDeviceGetAttribute(MultiProcessorCount)");
  }
  const int64_t wave = static_cast<int64_t>(sms) * max_active_blocks_per_sm<Gemm>();
  const int64_t tm = (p.m + TB::kM - 1) / TB::kM;
  const int64_t tn = (p.n + TB::kN - 1) / TB::kN;
  const int64_t e = p.num_groups;
  const int64_t tile_bound = (p.ragged_k ? tm * e : tm + e) * tn;
  return static_cast<int>(std::max<int64_t>(1, std::min(wave, tile_bound)));
}

// ---- the entry point every per-instantiation .cu file wraps ----

template <typename Element, typename LayoutA, typename LayoutB, typename Config>
void run_grouped(const GroupedMmParams& p, void* workspace, const LaunchConfig& cfg) {
  using Gemm = typename GroupedGemm<Element, LayoutA, LayoutB, Config>::Gemm;
  using Kernel = typename Gemm::GemmKernel;
  static_assert(!Kernel::ProblemVisitor::kRequiresPrecomputation,
                "device-only schedule: no host precompute, no CUTLASS workspace");
  static_assert(sizeof(cutlass::gemm::GemmCoord) == 3 * sizeof(int32_t) &&
                    std::is_same_v<cutlass::gemm::GemmCoord::Index, int32_t>,
                "the argument builder writes GemmCoord as three int32 (m, n, k)");

  // Nothing for a GEMM to write: every output element is the zero-fill kernel's.
  if (p.num_groups <= 0 || p.m <= 0 || p.n <= 0 || (!p.ragged_k && p.k <= 0)) return;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (p.m > kIntMax || p.n > kIntMax || p.k > kIntMax) {
    throw std::runtime_error("mixops::grouped_mm: CUTLASS path needs m, n, k < 2^31");
  }
  if (workspace == nullptr) throw std::runtime_error("mixops::grouped_mm: null workspace");

  using EA = typename Gemm::ElementA;
  using EB = typename Gemm::ElementB;
  using EC = typename Gemm::ElementC;
  const ArgsLayout l = args_layout(p.num_groups);
  char* ws = static_cast<char*>(workspace);
  const GroupArgs<EA, EB, EC> d{
      reinterpret_cast<int32_t*>(ws + l.problems), reinterpret_cast<EA**>(ws + l.ptr_a),
      reinterpret_cast<EB**>(ws + l.ptr_b),        reinterpret_cast<EC**>(ws + l.ptr_d),
      reinterpret_cast<int64_t*>(ws + l.lda),      reinterpret_cast<int64_t*>(ws + l.ldb),
      reinterpret_cast<int64_t*>(ws + l.ldd)};
  auto* problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(d.shapes);

  // Alignment-1 kernels take every group; the vector ones skip the groups whose start or
  // unit-stride extent breaks their 16-byte vectors (the launcher runs the fallback for those).
  static_assert(Config::kAlignment == 1 || Config::kAlignment * sizeof(EA) == 16,
                "grouped_mm_group_aligned assumes 16-byte vectors");
  constexpr GroupAlignRule kRule =
      Config::kAlignment == 1 ? GroupAlignRule::kAny : GroupAlignRule::kCutlass2;
  const unsigned build_blocks =
      static_cast<unsigned>((p.num_groups + kBuildArgsThreads - 1) / kBuildArgsThreads);
  launch_kernel(&build_group_args<EA, EB, EC, kRule, Gemm>, build_blocks, kBuildArgsThreads, 0,
                cfg.stream, p, d);
  check_launch("grouped_mm", "argument-builder launch");

  // GemmGrouped::initialize() would set the shared-memory attribute on every call; this sets it
  // once per device and launches the kernel as GemmGrouped::run() does (the device-only schedule
  // has no precompute and no workspace: Params is just the arguments).
  constexpr int64_t kSmem = sizeof(typename Kernel::SharedStorage);
  allow_dynamic_smem_once<&cutlass::Kernel<Kernel>, kSmem>("grouped_mm",
                                                           "CUTLASS GemmGrouped tile");
  typename Gemm::Arguments args(problems, p.num_groups, persistent_block_count<Gemm>(p, cfg),
                                typename Gemm::EpilogueOutputOp::Params(1.0f, 0.0f),  //
                                d.ptr_a, d.ptr_b, /*ptr_C=*/d.ptr_d, d.ptr_d,         //
                                d.ld_a, d.ld_b, /*ldc=*/d.ld_d, d.ld_d,
                                /*host_problem_sizes=*/nullptr);
  throw_on_status(Gemm::can_implement(args), "can_implement");
  const typename Kernel::Params params(args, /*workspace=*/nullptr);
  launch_kernel(&cutlass::Kernel<Kernel>, dim3(args.threadblock_count), dim3(Kernel::kThreadCount),
                kSmem, cfg.stream, params);
  check_launch("grouped_mm", "CUTLASS GemmGrouped launch");
}

}  // namespace mixops::cuda::sm80
