// The CUDA side of device error reporting (core/errors.h): one small int32 array per device,
// allocated on first use and kept for the life of the process (so kernels of a captured CUDA graph
// keep pointing at valid memory), and the reader that check_errors() calls. Never synchronises
// except inside check_errors() and MIXOPS_DEBUG=1.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <mutex>
#include <vector>

#include "core/error_record.h"
#include "core/op_scratch.h"

namespace mixops::cuda {
namespace {

constexpr int kMaxDevices = 64;
constexpr size_t kRecordBytes = kNumErrorSlots * sizeof(int32_t);

std::array<std::atomic<int32_t*>, kMaxDevices> g_records{};
std::array<std::once_flag, kMaxDevices> g_once;

// Allocates and zeroes `device`'s record. It may run while another stream is being captured: the
// calls below are made legal by switching this thread to relaxed capture mode, and the zeroing
// runs on a private non-blocking stream, so no captured stream is touched.
int32_t* allocate_record(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* p = nullptr;
  cudaStream_t side = nullptr;
  cudaError_t e = cudaMalloc(&p, kRecordBytes);
  if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaMemsetAsync(p, 0, kRecordBytes, side);
  if (e == cudaSuccess) e = cudaStreamSynchronize(side);
  if (side != nullptr) (void)cudaStreamDestroy(side);
  cudaStreamCaptureMode back = mode;
  (void)cudaThreadExchangeStreamCaptureMode(&back);
  C10_CUDA_CHECK(e);
  return static_cast<int32_t*>(p);
}

std::vector<std::vector<int32_t>> read_and_clear_all() {
  std::vector<std::vector<int32_t>> out;
  for (int d = 0; d < kMaxDevices; ++d) {
    int32_t* rec = g_records[d].load(std::memory_order_acquire);
    if (rec == nullptr) continue;
    out.resize(d + 1);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "mixops.check_errors() cannot run while a CUDA graph is being captured; call it "
                "after capture or after replay");
    // One synchronisation: every kernel enqueued before has OR-ed its bits.
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int32_t> bits(kNumErrorSlots, 0);
    C10_CUDA_CHECK(cudaMemcpy(bits.data(), rec, kRecordBytes, cudaMemcpyDeviceToHost));
    C10_CUDA_CHECK(cudaMemset(rec, 0, kRecordBytes));
    out[d] = std::move(bits);
  }
  return out;
}

const bool g_reader_registered = [] {
  set_device_error_reader(&read_and_clear_all);
  return true;
}();

}  // namespace

int32_t* device_error_slot(int device, ErrorSlot slot) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "mixops: CUDA device index ", device,
              " out of range [0, ", kMaxDevices, ")");
  std::call_once(g_once[device], [device] { g_records[device].store(allocate_record(device)); });
  return g_records[device].load(std::memory_order_acquire) + static_cast<int>(slot);
}

}  // namespace mixops::cuda
