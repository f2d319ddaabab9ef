// Host side of device error reporting: see core/error_record.h.
#include "core/error_record.h"

#include <c10/util/Exception.h>

#include <array>
#include <mutex>
#include <utility>
#include <vector>

namespace mixops {
namespace {

constexpr int kMaxDevices = 64;  // as core/cuda.cpp's records

struct Registry {
  std::mutex mu;
  std::array<ErrorMessageFn, kNumErrorSlots> message{};
  // (device, slot) -> the latest launch's context: a fixed table, since every CUDA op call
  // writes it (no allocation on that path).
  std::array<std::array<ErrorContext, kNumErrorSlots>, kMaxDevices> context{};
  DeviceErrorReader reader;
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: used from static initialisers
  return *r;
}

}  // namespace

bool register_error_message(ErrorSlot slot, ErrorMessageFn fn) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.message.at(static_cast<size_t>(slot)) = fn;
  return true;
}

void record_error_context(int device, ErrorSlot slot, const ErrorContext& ctx) {
  Registry& r = registry();
  if (device < 0 || device >= kMaxDevices) return;  // core/cuda.cpp refuses such devices
  std::lock_guard<std::mutex> lock(r.mu);
  r.context[device][static_cast<int>(slot)] = ctx;
}

std::string describe_device_errors(int device, const int32_t* bits) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::string out;
  for (int s = 0; s < kNumErrorSlots; ++s) {
    if (bits[s] == 0) continue;
    const ErrorContext ctx =
        device >= 0 && device < kMaxDevices ? r.context[device][s] : ErrorContext{};
    const ErrorMessageFn fn = r.message[s];
    const std::string text = fn != nullptr
                                 ? fn(bits[s], ctx)
                                 : std::string(error_slot_name(static_cast<ErrorSlot>(s))) +
                                       ": error bits " + std::to_string(bits[s]);
    if (!out.empty()) out += "\n";
    out += "cuda:" + std::to_string(device) + ": " + text;
  }
  return out;
}

void set_device_error_reader(DeviceErrorReader reader) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.reader = std::move(reader);
}

void check_errors() {
  DeviceErrorReader reader;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    reader = r.reader;
  }
  if (!reader) return;  // CPU-only build: CPU ops raise at the call
  const std::vector<std::vector<int32_t>> bits = reader();
  std::string msg;
  for (size_t d = 0; d < bits.size(); ++d) {
    if (bits[d].size() != static_cast<size_t>(kNumErrorSlots)) continue;
    const std::string text = describe_device_errors(static_cast<int>(d), bits[d].data());
    if (text.empty()) continue;
    if (!msg.empty()) msg += "\n";
    msg += text;
  }
  TORCH_CHECK(msg.empty(),
              "mixops.check_errors: CUDA ops saw invalid input values since the last "
              "check (they were clamped or ignored; sizes shown are those of the op's latest "
              "call):\n",
              msg);
}

}  // namespace mixops
