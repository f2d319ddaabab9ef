// grouped_mm, CUTLASS 2 family: one template that runs every group of a grouped_mm as a single
// persistent cutlass::gemm::device::GemmGrouped launch (GroupScheduleMode::kDeviceOnly), plus the
// small device kernel that builds GemmGrouped's per-group argument arrays from params.offsets.
//
// Why it is shaped this way:
//  * offsets live in device memory and must not be read by the host (no sync, CUDA-graph
//    capturable), so problem sizes, pointers and leading dimensions are built ON THE DEVICE, and
//    the kDeviceOnly schedule is the one GemmGrouped mode that never needs host problem sizes;
//  * the persistent block count comes from occupancy x SM count (capped by a host-known upper
//    bound on the tile count), never from the real problem sizes;
//  * each (element, layout combo, tile config) is instantiated in its own .cu file
//    (grouped_mm_*_sm80.cu, grouped_mm_fp32_*.cu) so the build compiles them in parallel.
// Output is row-major, fp32 accumulation, D = 1 * A@B + 0 * C with C aliasing D (never read).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "grouped_mm_sm80.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass/layout/matrix.h"
#include "mixops/grouped_mm_params.h"

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

// ---- device-side argument builder ----

// One thread per group: clamp the group's bounds (shared arithmetic with the CPU kernel), report
// bad offsets, and write the group's GemmCoord, operand pointers and leading dimensions.
// Templated on the Gemm so every translation unit owns a distinct kernel symbol.
template <typename Gemm>
__global__ void build_grouped_args(GroupedMmParams p, cutlass::gemm::GemmCoord* problems,
                                   typename Gemm::ElementA** ptr_a,
                                   typename Gemm::ElementB** ptr_b,
                                   typename Gemm::ElementC** ptr_d, int64_t* lda, int64_t* ldb,
                                   int64_t* ldd) {
  using EA = typename Gemm::ElementA;
  using EB = typename Gemm::ElementB;
  using EC = typename Gemm::ElementC;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.num_groups) return;
  int32_t err = 0;
  const GroupProblem q = grouped_mm_group_problem(p, static_cast<int32_t>(g), &err);
  if (err != 0 && p.error_flag != nullptr) atomicOr(p.error_flag, err);
  // An empty group gets no tiles at all (m = 0); the zero-fill kernel writes its output.
  const bool empty = q.gm == 0 || q.gk == 0;
  problems[g] = cutlass::gemm::GemmCoord(empty ? 0 : static_cast<int>(q.gm),
                                         static_cast<int>(q.gn), static_cast<int>(q.gk));
  // 64-bit element offsets on typed pointers (GemmGrouped wants non-const operand pointers).
  ptr_a[g] = const_cast<EA*>(static_cast<const EA*>(p.a)) + q.a_offset;
  ptr_b[g] = const_cast<EB*>(static_cast<const EB*>(p.b)) + q.b_offset;
  ptr_d[g] = static_cast<EC*>(p.out) + q.out_offset;
  // Leading dimensions come from the full operands, not the group shape: a ragged-k operand is
  // a slice of a larger matrix.
  lda[g] = grouped_mm_lda(p);
  ldb[g] = grouped_mm_ldb(p);
  ldd[g] = p.out_stride_m;
}

// ---- host helpers ----

inline void throw_on_status(cutlass::Status s, const char* what) {
  if (s == cutlass::Status::kSuccess) return;
  const cudaError_t e = cudaGetLastError();  // clears a pending launch/attribute error, if any
  throw std::runtime_error(std::string("mixops::grouped_mm: CUTLASS GemmGrouped ") + what +
                           " failed: " + cutlass::cutlassGetStatusString(s) +
                           " (last CUDA error: " + cudaGetErrorString(e) + ")");
}

inline void throw_on_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  throw std::runtime_error(std::string("mixops::grouped_mm: ") + what + ": " +
                           cudaGetErrorString(e));
}

// Resident blocks per SM for this kernel, queried once per device (occupancy queries and
// cudaFuncSetAttribute are not stream work, so this is safe under CUDA-graph capture).
template <typename Gemm>
int max_active_blocks_per_sm() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  throw_on_cuda(cudaGetDevice(&dev), "cudaGetDevice");
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
    throw_on_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    throw_on_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
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
  static_assert(sizeof(cutlass::gemm::GemmCoord) == 3 * sizeof(int32_t),
                "ArgsLayout assumes GemmCoord is three int32");

  // Nothing for a GEMM to write: every output element is the zero-fill kernel's.
  if (p.num_groups <= 0 || p.m <= 0 || p.n <= 0 || (!p.ragged_k && p.k <= 0)) return;
  constexpr int64_t kIntMax = 0x7fffffff;
  if (p.m > kIntMax || p.n > kIntMax || p.k > kIntMax) {
    throw std::runtime_error("mixops::grouped_mm: CUTLASS path needs m, n, k < 2^31");
  }
  if (workspace == nullptr) throw std::runtime_error("mixops::grouped_mm: null workspace");

  const ArgsLayout l = args_layout(p.num_groups);
  char* ws = static_cast<char*>(workspace);
  auto* problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(ws + l.problems);
  auto* ptr_a = reinterpret_cast<typename Gemm::ElementA**>(ws + l.ptr_a);
  auto* ptr_b = reinterpret_cast<typename Gemm::ElementB**>(ws + l.ptr_b);
  auto* ptr_d = reinterpret_cast<typename Gemm::ElementC**>(ws + l.ptr_d);
  auto* lda = reinterpret_cast<int64_t*>(ws + l.lda);
  auto* ldb = reinterpret_cast<int64_t*>(ws + l.ldb);
  auto* ldd = reinterpret_cast<int64_t*>(ws + l.ldd);

  constexpr int kBuildThreads = 128;
  const unsigned build_blocks =
      static_cast<unsigned>((p.num_groups + kBuildThreads - 1) / kBuildThreads);
  build_grouped_args<Gemm><<<build_blocks, kBuildThreads, 0, cfg.stream>>>(p, problems, ptr_a,
                                                                           ptr_b, ptr_d, lda, ldb,
                                                                           ldd);
  throw_on_cuda(cudaGetLastError(), "grouped_mm argument-builder launch");

  typename Gemm::Arguments args(problems, p.num_groups, persistent_block_count<Gemm>(p, cfg),
                                typename Gemm::EpilogueOutputOp::Params(1.0f, 0.0f),  //
                                ptr_a, ptr_b, /*ptr_C=*/ptr_d, ptr_d,                 //
                                lda, ldb, /*ldc=*/ldd, ldd,
                                /*host_problem_sizes=*/nullptr);
  Gemm gemm;
  throw_on_status(Gemm::can_implement(args), "can_implement");
  throw_on_status(gemm.initialize(args, /*workspace=*/nullptr, cfg.stream), "initialize");
  throw_on_status(gemm.run(cfg.stream), "run");
}

}  // namespace mixops::cuda::sm80
