// SIMT harness: the block scheduler. Runs the threads of one block as fibers, in rounds: each
// round resumes every runnable thread once, in the schedule's order (forward, reversed, or
// shuffled by a seeded generator), and each runs until it arrives at a collective (a barrier, a
// warp shuffle / vote / match) or ends. Between rounds, complete() releases every collective whose
// participants have all arrived; when nothing is runnable and nothing can be released, the block
// is stuck and diagnose() throws: divergent barriers, a deadlock, or lanes at different warp
// operations. Faults found inside a fiber (a bad mask, say) stop the launch the same way: the
// launch throws simt::Error naming the fault, the block and the thread, and never hangs.
#pragma once

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim/vector_types.h"
#include "simt_fiber.h"

// The per-thread built-ins, set on every switch into a fiber.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

namespace simt {

// Everything the harness detects: faults of the kernel and bad launches.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { kForward, kReversed, kShuffled };

inline const char* schedule_name(Schedule s) {
  return s == Schedule::kForward ? "forward" : s == Schedule::kReversed ? "reversed" : "shuffled";
}

namespace detail {

enum class Op : uint8_t { kSyncThreads, kSyncWarp, kShfl, kBallot, kMatchAny, kMatchAll, kReduce };
enum class State : uint8_t { kRunnable, kWaiting, kExited, kFaulted };
enum class Reduce : uint8_t { kAddU, kMinU, kMaxU, kAddI, kMinI, kMaxI, kAnd, kOr, kXor };

// A call site of a collective (threads meet only at the same one).
struct Site {
  const char* file = "";
  uint32_t line = 0, column = 0;
  static Site of(const std::source_location& l) { return {l.file_name(), l.line(), l.column()}; }
  bool operator==(const Site& o) const {
    return line == o.line && column == o.column &&
           (file == o.file || std::strcmp(file, o.file) == 0);
  }
  std::string str() const;
};

inline const char* basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}
inline std::string Site::str() const {
  return std::string(basename(file)) + ":" + std::to_string(line) + ":" + std::to_string(column);
}

struct Thread {
  Fiber fiber;
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  State state = State::kExited;
  // The collective this thread waits at (state kWaiting) and its operands / results.
  Op op = Op::kSyncThreads;
  const char* api = "";
  Site site;
  unsigned mask = 0;
  int src = 0;  // shuffles: the lane to read
  Reduce reduce = Reduce::kAddU;
  int pred = 0;  // votes and __syncthreads_count/and/or: in; also the result predicate
  unsigned result = 0;
  uint8_t bytes = 0;
  alignas(16) unsigned char in[16] = {}, out[16] = {};
};

// The state of the launch running on this OS thread (launches do not nest).
struct Machine {
  Host host;
  StackPool stacks;
  std::vector<Thread> threads;
  int nthreads = 0, live = 0;
  Thread* current = nullptr;
  std::string fault;  // set by a faulting fiber
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  Schedule schedule = Schedule::kForward;
  std::mt19937_64 rng;
  uint64_t max_rounds = 0;
  uint8_t poison = 0;
  bool running = false;
  // Shared memory: the dynamic buffer and the static variables of the running block.
  unsigned char* dynamic_smem = nullptr;
  size_t dynamic_bytes = 0;
  uint64_t block_serial = 0;  // changes at every block start (static slots compare against it)
  std::vector<void*> static_allocs;
  size_t static_bytes = 0;
  std::vector<int> order;
};

inline Machine& machine() {
  static thread_local Machine m;
  return m;
}

inline std::string where(const Thread& t) {
  auto v = [](uint3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
  };
  return "block " + v(blockIdx) + " thread " + v(t.tid) + " (warp " + std::to_string(t.warp) +
         " lane " + std::to_string(t.lane) + ")";
}

inline std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

// The thread whose fiber is running; outside a kernel, an error.
inline Thread& self(const char* api) {
  Machine& m = machine();
  if (m.current == nullptr) throw Error(std::string(api) + " called outside a kernel");
  return *m.current;
}

// Stops the calling thread for good and makes the launch throw the printf-formatted message.
// The fiber is abandoned, not unwound, so the message is formatted on the stack (nothing of the
// fiber's is left on the heap for LeakSanitizer to report).
[[noreturn]] __attribute__((format(printf, 2, 3))) inline void fault(Thread& t, const char* fmt,
                                                                     ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  Machine& m = machine();
  if (m.fault.empty()) m.fault = where(t) + ": " + msg;
  t.state = State::kFaulted;
  for (;;) m.host.yield(t.fiber);
}

// Records that t arrives at a collective and switches to the scheduler until it is released.
inline void arrive_and_wait(Thread& t, Op op, const char* api, const std::source_location& loc,
                            unsigned mask) {
  t.op = op;
  t.api = api;
  t.site = Site::of(loc);
  t.mask = mask;
  if (op != Op::kSyncThreads && ((mask >> t.lane) & 1u) == 0)
    fault(t, "%s at %s:%u:%u: mask 0x%08x does not include the calling lane %d", api,
          basename(t.site.file), t.site.line, t.site.column, mask, t.lane);
  t.state = State::kWaiting;
  machine().host.yield(t.fiber);
}

inline void fiber_main() {
  Machine& m = machine();
  Thread& t = *m.current;
  m.host.entered(t.fiber);
  char error[512] = "";
  try {
    m.body(m.body_ctx);
  } catch (const std::exception& e) {
    std::snprintf(error, sizeof error, "%s", e.what());
  } catch (...) {
    std::snprintf(error, sizeof error, "an exception of unknown type");
  }
  if (error[0] != 0) fault(t, "the kernel threw: %s", error);  // outside the handler: freed
  t.state = State::kExited;
  --m.live;
  m.host.finish(t.fiber);
}

inline bool lane_gone(const Machine& m, int base, int lane) {
  return base + lane >= m.nthreads || m.threads[base + lane].state == State::kExited;
}

// Computes the results of a warp collective whose lanes (mask, within the warp at base) have
// all arrived, and releases them.
inline void complete_warp_op(Machine& m, int base, Thread& lead) {
  const unsigned mask = lead.mask;
  unsigned votes = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && !lane_gone(m, base, l) && m.threads[base + l].pred) votes |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u) || lane_gone(m, base, l)) continue;
    Thread& t = m.threads[base + l];
    switch (t.op) {
      case Op::kShfl:
        if (!(mask >> t.src & 1u))
          throw Error(where(t) + ": " + t.api + " at " + t.site.str() + " reads lane " +
                      std::to_string(t.src) + ", which is not in the mask " + hex(mask));
        std::memcpy(t.out, m.threads[base + t.src].in, t.bytes);
        break;
      case Op::kBallot: t.result = votes; break;
      case Op::kMatchAny:
      case Op::kMatchAll: {
        unsigned same = 0;
        for (int j = 0; j < 32; ++j)
          if ((mask >> j & 1u) && !lane_gone(m, base, j) &&
              std::memcmp(t.in, m.threads[base + j].in, t.bytes) == 0)
            same |= 1u << j;
        t.result = same;
        if (t.op == Op::kMatchAll) {
          const unsigned all = mask;
          t.pred = same == all;
          t.result = same == all ? all : 0;
        }
        break;
      }
      case Op::kReduce: {
        uint32_t acc = 0;
        bool first = true;
        for (int j = 0; j < 32; ++j) {
          if (!(mask >> j & 1u) || lane_gone(m, base, j)) continue;
          uint32_t v;
          std::memcpy(&v, m.threads[base + j].in, 4);
          const auto sv = static_cast<int32_t>(v), sa = static_cast<int32_t>(acc);
          switch (t.reduce) {
            case Reduce::kAddU:
            case Reduce::kAddI: acc = first ? v : acc + v; break;
            case Reduce::kMinU: acc = first || v < acc ? v : acc; break;
            case Reduce::kMaxU: acc = first || v > acc ? v : acc; break;
            case Reduce::kMinI: acc = first || sv < sa ? v : acc; break;
            case Reduce::kMaxI: acc = first || sv > sa ? v : acc; break;
            case Reduce::kAnd: acc = first ? v : acc & v; break;
            case Reduce::kOr: acc = first ? v : acc | v; break;
            case Reduce::kXor: acc = first ? v : acc ^ v; break;
          }
          first = false;
        }
        t.result = acc;
        break;
      }
      default: break;
    }
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && !lane_gone(m, base, l)) m.threads[base + l].state = State::kRunnable;
}

// Releases every collective whose participants have all arrived; true if any was.
inline bool complete(Machine& m) {
  bool released = false;
  const int nwarps = (m.nthreads + 31) / 32;
  for (int w = 0; w < nwarps; ++w) {
    const int base = w * 32;
    for (int l = 0; l < 32 && base + l < m.nthreads; ++l) {
      Thread& t = m.threads[base + l];
      if (t.state != State::kWaiting || t.op == Op::kSyncThreads) continue;
      bool ready = true;
      for (int j = 0; j < 32; ++j) {
        if (!(t.mask >> j & 1u)) continue;
        if (lane_gone(m, base, j)) {
          if (t.op == Op::kSyncWarp) continue;  // exited lanes count as arrived at barriers
          throw Error(where(t) + ": " + t.api + " at " + t.site.str() + ": mask " + hex(t.mask) +
                      " names lane " + std::to_string(j) +
                      (base + j >= m.nthreads ? ", which does not exist (partial warp)"
                                              : ", which has exited"));
        }
        const Thread& u = m.threads[base + j];
        if (u.state != State::kWaiting || u.op != t.op || !(u.site == t.site)) {
          ready = false;
          continue;
        }
        if (u.mask != t.mask)
          throw Error(where(t) + ": " + t.api + " at " + t.site.str() + " with mask " +
                      hex(t.mask) + ", but lane " + std::to_string(j) + " passes mask " +
                      hex(u.mask));
      }
      if (ready) {
        complete_warp_op(m, base, t);
        released = true;
      }
    }
  }
  // The block barrier: every live thread at __syncthreads, at the same call site.
  int at_barrier = 0;
  const Thread* first = nullptr;
  for (Thread& t : m.threads)
    if (t.state == State::kWaiting && t.op == Op::kSyncThreads) {
      ++at_barrier;
      if (first == nullptr) first = &t;
    }
  if (at_barrier > 0 && at_barrier == m.live) {
    bool same = true;
    for (Thread& t : m.threads)
      if (t.state == State::kWaiting && !(t.site == first->site)) same = false;
    if (same) {
      int count = 0;
      for (Thread& t : m.threads) count += t.state == State::kWaiting && t.pred != 0;
      for (Thread& t : m.threads)
        if (t.state == State::kWaiting) {
          t.result = static_cast<unsigned>(count);
          t.src = at_barrier;  // participants, for __syncthreads_and
          t.state = State::kRunnable;
        }
      released = true;
    }
  }
  return released;
}

inline std::string describe_wait(const Thread& t) {
  std::string s = where(t) + " waits at " + t.api + " (" + t.site.str() + ")";
  if (t.op != Op::kSyncThreads) s += " mask " + hex(t.mask);
  return s;
}

// Nothing runnable and nothing released: says why, as an Error.
[[noreturn]] inline void diagnose(Machine& m) {
  std::vector<const Thread*> waiting;
  for (const Thread& t : m.threads)
    if (t.state == State::kWaiting) waiting.push_back(&t);
  bool all_block = true;
  for (const Thread* t : waiting) all_block = all_block && t->op == Op::kSyncThreads;
  if (all_block) {
    for (const Thread* t : waiting)
      if (!(t->site == waiting[0]->site))
        throw Error("divergent __syncthreads: " + describe_wait(*waiting[0]) + ", but " +
                    describe_wait(*t));
  }
  // Lanes of one warp at the same kind of warp operation, but at different call sites.
  for (const Thread* t : waiting) {
    if (t->op == Op::kSyncThreads) continue;
    const int base = t->warp * 32;
    for (int j = 0; j < 32; ++j) {
      if (!(t->mask >> j & 1u) || lane_gone(m, base, j)) continue;
      const Thread& u = m.threads[base + j];
      if (u.state == State::kWaiting && u.op == t->op && !(u.site == t->site))
        throw Error(std::string("divergent ") + t->api + ": " + describe_wait(*t) + ", but " +
                    describe_wait(u));
    }
  }
  std::string msg = "deadlock: no thread of the block can make progress: ";
  for (size_t i = 0; i < waiting.size() && i < 4; ++i)
    msg += (i ? "; " : "") + describe_wait(*waiting[i]);
  if (waiting.size() > 4) msg += "; ... (" + std::to_string(waiting.size()) + " threads wait)";
  throw Error(msg);
}

// Runs block `bidx` of the current launch to its end (or throws).
inline void run_block(Machine& m, uint3 bidx) {
  blockIdx = bidx;
  ++m.block_serial;
  for (void* p : m.static_allocs) ::operator delete(p, std::align_val_t(64));
  m.static_allocs.clear();
  m.static_bytes = 0;
  if (m.dynamic_bytes) std::memset(m.dynamic_smem, m.poison, m.dynamic_bytes);
  for (int i = 0; i < m.nthreads; ++i) {
    Thread& t = m.threads[i];
    t.state = State::kRunnable;
    t.pred = 0;
    t.fiber.stack = m.stacks.stacks[i];
    t.fiber.asan_fake = nullptr;
    make_context(t.fiber.ctx, t.fiber.stack, &fiber_main);
  }
  m.live = m.nthreads;
  uint64_t rounds = 0;
  while (m.live > 0) {
    m.order.clear();
    for (int i = 0; i < m.nthreads; ++i)
      if (m.threads[i].state == State::kRunnable) m.order.push_back(i);
    if (m.order.empty()) {
      if (!complete(m)) diagnose(m);
      continue;
    }
    if (m.schedule == Schedule::kReversed) {
      std::reverse(m.order.begin(), m.order.end());
    } else if (m.schedule == Schedule::kShuffled) {
      for (size_t i = m.order.size(); i > 1; --i) std::swap(m.order[i - 1], m.order[m.rng() % i]);
    }
    for (int i : m.order) {
      Thread& t = m.threads[i];
      m.current = &t;
      threadIdx = t.tid;
      m.host.resume(t.fiber);
      m.current = nullptr;
      if (!m.fault.empty()) throw Error(m.fault);
    }
    complete(m);
    if (++rounds > m.max_rounds)
      throw Error("block " + std::to_string(bidx.x) + " ran more than " +
                  std::to_string(m.max_rounds) +
                  " scheduling rounds (a thread looping forever through a collective?)");
  }
}

}  // namespace detail
}  // namespace simt
