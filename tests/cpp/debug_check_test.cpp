// MIXOPS_DEBUG=1's decision after a CUDA op's launch (csrc/core/debug_check.h), checked on the host
// with a plain C++ compiler: tests/test_debug_capture.py compiles and runs this. Prints one line
// per failure and "OK" when all pass.
#include "core/debug_check.h"

#include <cstdio>

using mixops::CaptureState;
using mixops::debug_action;
using mixops::debug_env_on;
using mixops::DebugAction;

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

const char* name(DebugAction a) {
  switch (a) {
    case DebugAction::kNone: return "kNone";
    case DebugAction::kCheck: return "kCheck";
    case DebugAction::kSkipCapturing: return "kSkipCapturing";
  }
  return "?";
}

void expect_action(bool debug, CaptureState state, DebugAction want, bool queried,
                   const char* what) {
  int queries = 0;
  const DebugAction got = debug_action(debug, [&] {
    ++queries;
    return state;
  });
  if (got != want) {
    std::printf("FAIL %s: got %s, want %s\n", what, name(got), name(want));
    ++failures;
  }
  if ((queries > 0) != queried) {
    std::printf("FAIL %s: the capture state was %s\n", what,
                queried ? "not queried" : "queried without MIXOPS_DEBUG");
    ++failures;
  }
}

}  // namespace

int main() {
  // MIXOPS_DEBUG's value.
  expect(!debug_env_on(nullptr), "unset is off");
  expect(!debug_env_on(""), "empty is off");
  expect(!debug_env_on("0"), "0 is off");
  expect(debug_env_on("1"), "1 is on");
  expect(debug_env_on("yes"), "any other value is on");

  // Off: nothing to do, and no CUDA call to ask about capture.
  expect_action(false, CaptureState::kNone, DebugAction::kNone, false, "off, not capturing");
  expect_action(false, CaptureState::kActive, DebugAction::kNone, false, "off, capturing");
  // On: check, unless the stream is capturing (a sync there breaks the capture).
  expect_action(true, CaptureState::kNone, DebugAction::kCheck, true, "on, not capturing");
  expect_action(true, CaptureState::kActive, DebugAction::kSkipCapturing, true, "on, capturing");
  expect_action(true, CaptureState::kInvalidated, DebugAction::kSkipCapturing, true,
                "on, capture invalidated");
  expect_action(true, CaptureState::kImplicit, DebugAction::kSkipCapturing, true,
                "on, legacy stream beside a capture");

  if (failures == 0) std::printf("OK\n");
  return failures == 0 ? 0 : 1;
}
