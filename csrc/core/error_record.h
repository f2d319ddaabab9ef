// The host side of device error reporting (core/errors.h), compiled in every build: the message
// function of each slot (registered by the families' check.cpp), the context of the latest launch
// per (device, slot), and check_errors(), which asks the CUDA side (when built) for the bits of
// every device, clears them, and raises one error naming every op that saw bad values.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "core/errors.h"

namespace mixops {

// Called once per slot at static initialisation by the family that owns it.
bool register_error_message(ErrorSlot slot, ErrorMessageFn fn);

// Remembered at every launch of a slot's op (cheap, host only; the message of a later check
// shows these values).
void record_error_context(int device, ErrorSlot slot, const ErrorContext& ctx);

// The text for the bits of one device's slots (bits[kNumErrorSlots]); "" when no bit is set.
std::string describe_device_errors(int device, const int32_t* bits);

// The CUDA side: for every device with a record, synchronise, copy its bits into
// out[device][slot] and zero them on the device. Absent in CPU-only builds.
using DeviceErrorReader = std::function<std::vector<std::vector<int32_t>>()>;
void set_device_error_reader(DeviceErrorReader reader);

// Raises a c10::Error describing every set bit on every device (and clears them); returns quietly
// when none is set, when no CUDA op ran, or in a CPU-only build. One synchronisation per device.
void check_errors();

}  // namespace mixops
