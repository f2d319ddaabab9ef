// MIXOPS_DEBUG=1's decision after a CUDA op's launch, torch- and CUDA-free so that tests/cpp checks
// it with a plain C++ compiler: check the op's error slot (read it, synchronise, raise), or skip.
// The check is a device-to-host copy and a stream synchronisation, both illegal on a stream that
// is being captured into a CUDA graph (the capture would fail with an opaque error), so it is
// skipped there: the captured kernels still set their bits on every replay, and
// mixops.check_errors() after a replay reports them. core/op_scratch.h applies this.
#pragma once

namespace mixops {

// The capture state of the op's stream (cudaStreamIsCapturing, core/op_scratch.h). kImplicit: the
// legacy default stream while a blocking stream on its device is capturing (synchronising the
// legacy stream would invalidate that capture).
enum class CaptureState { kNone, kActive, kInvalidated, kImplicit };

enum class DebugAction {
  kNone,           // MIXOPS_DEBUG off: the bits stay for mixops.check_errors()
  kCheck,          // read and clear the op's slot, synchronise, raise the CPU path's message
  kSkipCapturing,  // MIXOPS_DEBUG on, but the stream is capturing: as kNone
};

// The value of the MIXOPS_DEBUG environment variable turns debug mode on unless it is unset,
// empty, or starts with '0'.
inline bool debug_env_on(const char* value) {
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

// What an op does after its launch. capture_state() (returning CaptureState) is called only in
// debug mode, so an op without MIXOPS_DEBUG makes no extra CUDA call.
template <class CaptureQuery>
DebugAction debug_action(bool debug, const CaptureQuery& capture_state) {
  if (!debug) return DebugAction::kNone;
  return capture_state() == CaptureState::kNone ? DebugAction::kCheck : DebugAction::kSkipCapturing;
}

}  // namespace mixops
