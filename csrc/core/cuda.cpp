// The CUDA side of device error reporting (core/errors.h): one small int32 array per device,
// allocated on first use and kept for the life of the process (so kernels of a captured CUDA graph
// keep pointing at valid memory), and the readers that check_errors() and MIXOPS_DEBUG=1 call.
// Reading and clearing is one atomic exchange per slot on the device (core/errors.cu), ordered on
// the caller's torch stream, so no bit a concurrent kernel sets is lost between a read and a
// clear. Never synchronises except inside check_errors() and MIXOPS_DEBUG=1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <exception>
#include <mutex>
#include <vector>

#include "core/error_record.h"
#include "core/errors_launch.h"
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
  // Refuse before anything is read: a read record whose bits are then thrown away is lost.
  for (int d = 0; d < kMaxDevices; ++d) {
    if (g_records[d].load(std::memory_order_acquire) == nullptr) continue;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                "mixops.check_errors() cannot run while a CUDA graph is being captured; call it "
                "after capture or after replay");
  }
  std::vector<std::vector<int32_t>> out;
  for (int d = 0; d < kMaxDevices; ++d) {
    if (g_records[d].load(std::memory_order_acquire) == nullptr) continue;
    out.resize(d + 1);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
    // Every kernel enqueued before, on any stream, has OR-ed its bits; then the exchange on the
    // current stream takes them (bits of kernels still being launched by other threads are taken
    // now or by the next check, never dropped).
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    out[d] = take_error_bits(d, static_cast<ErrorSlot>(0), kNumErrorSlots,
                             c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(d)));
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

std::vector<int32_t> take_error_bits(int device, ErrorSlot first, int n, cudaStream_t stream) {
  const int s0 = static_cast<int>(first);
  TORCH_CHECK(s0 >= 0 && n >= 0 && s0 + n <= kNumErrorSlots, "mixops: error slots [", s0, ", ",
              s0 + n, ") out of range [0, ", kNumErrorSlots, ")");
  int32_t* rec = device_error_slot(device, first);
  // The exchanged bits land in a torch-allocator block (ordered on `stream`), then on the host.
  const at::Tensor out =
      at::empty({n}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
  std::vector<int32_t> bits(n, 0);
  try {
    exchange_error_bits_launch(rec, out.data_ptr<int32_t>(), n, stream);
  } catch (const std::exception& ex) {
    TORCH_CHECK(false, "mixops: reading the device error record failed: ", ex.what());
  }
  C10_CUDA_CHECK(cudaMemcpyAsync(bits.data(), out.data_ptr<int32_t>(), n * sizeof(int32_t),
                                 cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return bits;
}

}  // namespace mixops::cuda
