// The run configuration a driver entry point receives from pytest (tests/simt_driver.py's
// SimtRun, same layout), and the wrapper that applies it to simt::launch_options and turns any
// exception into an error message. Include after launch_bridge.h.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>

#include "launch_bridge.h"

struct SimtRun {
  int schedule;  // 0 forward, 1 reversed, 2 shuffled
  uint64_t seed;
  uint8_t poison;
  int arch;        // 80 or 90: shared-memory opt-in limit
  int smem_optin;  // the device's reported opt-in (what launch plans see); 0: arch's limit
};

namespace simt {

// Fills bytes with a run's poison byte: what device memory could hold before a kernel writes it.
inline void poison(void* p, size_t bytes, uint8_t byte) {
  if (p != nullptr && bytes > 0) std::memset(p, byte, bytes);
}

// A launcher's workspace: `bytes` of 256-byte-aligned host memory filled with the poison byte
// (null when bytes is 0), freed at the end of the scope.
class Workspace {
 public:
  Workspace(size_t bytes, uint8_t byte)
      : p_(bytes > 0 ? std::aligned_alloc(256, (bytes + 255) / 256 * 256) : nullptr) {
    if (bytes > 0 && p_ == nullptr) throw std::bad_alloc();
    poison(p_, bytes, byte);
  }
  ~Workspace() { std::free(p_); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* get() const { return p_; }

 private:
  void* p_;
};

// Runs f() under run's options; returns 0, or 1 with the message in err.
template <class F>
int run_with(const SimtRun* run, char* err, int err_len, F&& f) {
  Options o;
  o.schedule = run->schedule == 1   ? Schedule::kReversed
               : run->schedule == 2 ? Schedule::kShuffled
                                    : Schedule::kForward;
  o.seed = run->seed;
  o.poison = run->poison;
  o.arch = run->arch == 80 ? Arch::kSm80 : Arch::kSm90;
  launch_options = o;
  device_max_smem_optin =
      run->smem_optin > 0 ? run->smem_optin : static_cast<int>(max_dynamic_smem(o.arch));
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
  } catch (...) {
    std::snprintf(err, err_len, "unknown exception");
  }
  return 1;
}

}  // namespace simt
