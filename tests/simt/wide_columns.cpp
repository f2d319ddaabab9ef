// gated_activation's CUDA launch code on half rows of about 2^31 columns and more, on the CPU
// (tests/test_simt_wide_columns.py builds and runs this): the real launcher
// (csrc/activation/activation.cu) through the SIMT bridge, its real grid, but only one block of
// it run (simt::Options::block_begin/end), on buffers that are mapped but never touched except
// where that block's threads walk (a few MB of pages for buffers of up to 32 GB).
//
// Each buffer sits behind 2^31 elements of inaccessible address space, so a column index that
// wraps negative (a 32-bit index past 2^31 - 1) faults there: the handler names the buffer and
// exits with status 4. Otherwise every column the block visits must hold the kernel's value
// (activation.h's math, as the kernel applies it), and columns of the next block, which does not
// run, must still hold the poison. Prints one "CASE <name> PASS|FAIL <detail>" line per case and
// exits 0 when all pass. `wide_columns <name>` runs one case.
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch_bridge.h"
// clang-format off: the launch file after the bridge
#include "activation/activation.cu"
// clang-format on

namespace {

using mixops::GatedAct;
using mixops::GatedActParams;

constexpr int64_t kTwo31 = int64_t{1} << 31;

// An inaccessible range in front of a buffer, for the SIGSEGV handler.
struct Guard {
  uintptr_t begin = 0, end = 0;
  const char* name = "";
};
Guard g_guards[8];
int g_num_guards = 0;

void say(const char* s) { (void)!write(2, s, std::strlen(s)); }

void on_segv(int, siginfo_t* info, void*) {
  const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
  for (int i = 0; i < g_num_guards; ++i) {
    if (a >= g_guards[i].begin && a < g_guards[i].end) {
      say("wide_columns: an access before ");
      say(g_guards[i].name);
      say(": a column index wrapped negative\n");
      _exit(4);
    }
  }
  say("wide_columns: SIGSEGV outside the guard regions\n");
  _exit(5);
}

// `elems` elements of T, page aligned, behind 2^31 * sizeof(T) bytes and before one page of
// PROT_NONE; MAP_NORESERVE, so only the pages touched take memory.
template <class T>
class Mapped {
 public:
  Mapped(int64_t elems, const char* name) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    guard_ = static_cast<size_t>(kTwo31) * sizeof(T);
    body_ = (static_cast<size_t>(elems) * sizeof(T) + page - 1) / page * page;
    total_ = guard_ + body_ + page;
    void* m = mmap(nullptr, total_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error(std::string("mmap failed for ") + name);
    base_ = static_cast<char*>(m);
    if (mprotect(base_ + guard_, body_, PROT_READ | PROT_WRITE) != 0) {
      munmap(base_, total_);
      throw std::runtime_error(std::string("mprotect failed for ") + name);
    }
    g_guards[g_num_guards++] = {reinterpret_cast<uintptr_t>(base_),
                                reinterpret_cast<uintptr_t>(base_ + guard_), name};
  }
  ~Mapped() {
    --g_num_guards;
    munmap(base_, total_);
  }
  Mapped(const Mapped&) = delete;
  Mapped& operator=(const Mapped&) = delete;
  T* get() const { return reinterpret_cast<T*>(base_ + guard_); }

 private:
  char* base_ = nullptr;
  size_t guard_ = 0, body_ = 0, total_ = 0;
};

// A value in [-4, 4) for column c (a hash: neighbours differ).
float value_at(int64_t c, uint32_t salt) {
  uint64_t x = static_cast<uint64_t>(c) * 0x9E3779B97F4A7C15ull + salt;
  x ^= x >> 29;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 32;
  return static_cast<float>(x % 8192) / 1024.0f - 4.0f;
}

template <class T>
T poison_value() {
  T t;
  std::memset(&t, 0xA5, sizeof t);
  return t;
}

template <class T>
bool same(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
constexpr mixops::Dtype dtype_code() {
  if constexpr (std::is_same_v<T, float>) return mixops::Dtype::kFloat32;
  if constexpr (std::is_same_v<T, double>) return mixops::Dtype::kFloat64;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return mixops::Dtype::kBFloat16;
  return mixops::Dtype::kFloat16;
}

struct Case {
  const char* name;
  mixops::Dtype dtype;
  int64_t f;        // columns of each half row (one row)
  bool last_block;  // run the grid's last block (else block 0)
  bool backward;
};

// Calls f(e) for the element columns e that the threads of block b visit: the vector columns
// c = b * bx + x + i * stride < fv (x < bx, i >= 0), elements c * n .. c * n + n - 1.
template <class F>
void for_block_columns(int64_t b, int64_t bx, int64_t stride, int64_t fv, int n, const F& f) {
  for (int64_t x = 0; x < bx; ++x) {
    for (int64_t c = b * bx + x; c < fv; c += stride) {
      for (int j = 0; j < n; ++j) f(c * n + j);
    }
  }
}

template <class T>
std::string run_case(const Case& k) {
  namespace ak = mixops::cuda::activation_kernels;
  namespace det = mixops::det;
  namespace act = mixops::act;
  using mixops::cuda::from_acc;
  using mixops::cuda::to_acc;
  using A = mixops::cuda::acc_t<T>;
  constexpr GatedAct kAct = GatedAct::kSilu;
  const int64_t f = k.f;
  Mapped<T> h(2 * f, "gate_up");  // [1, 2f]: gate then up
  Mapped<T> out(k.backward ? 2 * f : f, k.backward ? "grad_gate_up" : "out");
  Mapped<T> grad(k.backward ? f : 1, "grad_out");
  T* gate = h.get();
  T* up = h.get() + f;
  T* o = out.get();

  GatedActParams p;
  p.dtype = dtype_code<T>();
  p.act = kAct;
  p.rows = 1, p.f = f, p.gate_up = gate, p.gate_up_stride = 2 * f;
  if (k.backward) {
    p.grad_out = grad.get(), p.grad_gate_up = o;
  } else {
    p.out = o;
  }
  auto launch = [&] {
    simt::launched.clear();
    if (k.backward) {
      mixops::cuda::gated_activation_backward_launch(p, nullptr);
    } else {
      mixops::cuda::gated_activation_launch(p, nullptr);
    }
  };

  // The launcher's grid and vector width, with no block run.
  simt::launch_options = simt::Options{};
  simt::launch_options.block_begin = simt::launch_options.block_end = 0;
  launch();
  constexpr int kVec = std::is_same_v<T, double> ? 1 : static_cast<int>(16 / sizeof(T));
  const bool scalar = k.backward ? simt::ran(&ak::gated_act_backward_kernel<kAct, T, 1, false>)
                                 : simt::ran(&ak::gated_act_kernel<kAct, T, 1, false>);
  const int n = scalar ? 1 : kVec;
  const dim3 grid = simt::last_grid, block = simt::last_block;
  if (grid.y != 1 || block.y != 1) return "expected one row of threads for one row";
  const int64_t bx = block.x, stride = int64_t{grid.x} * block.x, fv = f / n;
  const int64_t b = k.last_block ? grid.x - 1 : 0;
  const int64_t other = k.last_block ? b - 1 : b + 1;  // a block that does not run

  // Inputs where the block reads, poison where it writes, and the same for one column vector
  // per thread of the other block (which must stay poisoned).
  auto fill = [&](int64_t e) {
    gate[e] = from_acc<T>(value_at(e, 1));
    up[e] = from_acc<T>(value_at(e, 2));
    if (k.backward) grad.get()[e] = from_acc<T>(value_at(e, 3));
    o[e] = poison_value<T>();
    if (k.backward) o[f + e] = poison_value<T>();
  };
  for_block_columns(b, bx, stride, fv, n, fill);
  for_block_columns(other, bx, stride, std::min(fv, (other + 1) * bx), n, fill);

  simt::launch_options.block_begin = b;
  simt::launch_options.block_end = b + 1;
  launch();

  std::string bad;
  int64_t visited = 0;
  for_block_columns(b, bx, stride, fv, n, [&](int64_t e) {
    ++visited;
    if (!bad.empty()) return;
    const A g = to_acc(gate[e]), u = to_acc(up[e]);
    bool ok;
    if (k.backward) {
      const A go = to_acc(grad.get()[e]);
      A v, d;
      act::value_and_grad<kAct, A>(g, v, d);
      ok = same(o[e], from_acc<T>(det::mul(det::mul(go, u), d))) &&
           same(o[f + e], from_acc<T>(det::mul(go, v)));
    } else {
      ok = same(o[e], from_acc<T>(det::mul(act::value<kAct, A>(g), u)));
    }
    if (!ok) bad = "column " + std::to_string(e) + " does not hold the kernel's value";
  });
  if (!bad.empty()) return bad;
  if (visited < bx * n) return "the block visited only " + std::to_string(visited) + " columns";
  for_block_columns(other, bx, stride, std::min(fv, (other + 1) * bx), n, [&](int64_t e) {
    if (bad.empty() &&
        (!same(o[e], poison_value<T>()) || (k.backward && !same(o[f + e], poison_value<T>())))) {
      bad = "column " + std::to_string(e) + " of block " + std::to_string(other) +
            " (not run) was written";
    }
  });
  return bad;
}

std::string run(const Case& k) {
  try {
    switch (k.dtype) {
      case mixops::Dtype::kFloat32: return run_case<float>(k);
      case mixops::Dtype::kFloat64: return run_case<double>(k);
      case mixops::Dtype::kBFloat16: return run_case<__nv_bfloat16>(k);
      case mixops::Dtype::kFloat16: return run_case<__half>(k);
    }
    return "unknown dtype";
  } catch (const std::exception& e) {
    return e.what();
  }
}

// f: the largest half row the old launcher accepted (odd: the scalar path, where every thread's
// step past its last column passes 2^31 - 1); one just past 2^31 - 2^24 (only the first blocks'
// threads step past 2^31 - 1); past 2^31 on the scalar and the 16-byte path.
constexpr int64_t kMaxOld = kTwo31 - 1;
constexpr int64_t kNearWrap = kTwo31 - (int64_t{1} << 24) + (int64_t{1} << 20) + 1;
constexpr int64_t kPast = kTwo31 + 1001;
constexpr int64_t kPastVec = kTwo31 + 64;
const Case kCases[] = {
    {"bf16_max_old_fwd", mixops::Dtype::kBFloat16, kMaxOld, false, false},
    {"bf16_max_old_fwd_last", mixops::Dtype::kBFloat16, kMaxOld, true, false},
    {"bf16_max_old_bwd", mixops::Dtype::kBFloat16, kMaxOld, false, true},
    {"fp32_near_wrap_fwd", mixops::Dtype::kFloat32, kNearWrap, false, false},
    {"fp16_near_wrap_bwd", mixops::Dtype::kFloat16, kNearWrap, false, true},
    {"fp64_max_old_fwd", mixops::Dtype::kFloat64, kMaxOld, false, false},
    {"fp64_max_old_bwd", mixops::Dtype::kFloat64, kMaxOld, true, true},
    {"bf16_past_2_31_fwd", mixops::Dtype::kBFloat16, kPast, false, false},
    {"bf16_past_2_31_bwd", mixops::Dtype::kBFloat16, kPast, true, true},
    {"bf16_past_2_31_vec_fwd", mixops::Dtype::kBFloat16, kPastVec, true, false},
    {"fp32_past_2_31_vec_bwd", mixops::Dtype::kFloat32, kPastVec, false, true},
};

}  // namespace

int main(int argc, char** argv) {
  struct sigaction sa{};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);  // the harness chains to it for faults not on fiber stacks
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {
    for (const Case& k : kCases) std::printf("%s\n", k.name);
    return 0;
  }
  int failed = 0, ran = 0;
  for (const Case& k : kCases) {
    if (argc > 1 && std::strcmp(argv[1], k.name) != 0) continue;
    ++ran;
    const std::string err = run(k);
    std::printf("CASE %s %s%s%s\n", k.name, err.empty() ? "PASS" : "FAIL", err.empty() ? "" : " ",
                err.c_str());
    std::fflush(stdout);
    failed += !err.empty();
  }
  if (ran == 0) {
    std::printf("no case named %s\n", argc > 1 ? argv[1] : "");
    return 2;
  }
  return failed == 0 ? 0 : 1;
}
