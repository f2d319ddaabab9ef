// Self-test of the SIMT harness: deliberately broken kernels, each of which the harness must
// catch, and correct ones, which must pass with the right values. tests/test_simt_harness.py
// builds this twice (plain and -fsanitize=address) and runs it.
//
//   selftest            run every case (the out-of-bounds ones only print SKIP without ASan)
//   selftest NAME       run one case
//   selftest --list     print the case names
// Prints "CASE <name> <PASS|CAUGHT|SKIP|FAIL|MISSED> <detail>" per case; exits 1 if any case is
// FAIL (a correct kernel rejected or wrong) or MISSED (a broken kernel not caught).
#include <cub/cub.cuh>

#include <cstdio>
#include <cstring>
#include <memory>  // after simt.h: its keyword macros must leave libstdc++ intact
#include <string>
#include <vector>

#include "selftest_kernels.h"

namespace {

using simt::Region;

struct Fail {
  std::string msg;
};
void expect(bool ok, const std::string& what) {
  if (!ok) throw Fail{what};
}
template <class T>
Region region(std::vector<T>& v, const char* name) {
  return {v.data(), v.size() * sizeof(T), name};
}

// ---- faults that must be caught ---------------------------------------------------------------

void missing_syncthreads() {
  std::vector<int> out(64);
  simt::launch_checked({region(out, "out")}, k_block_exchange<false>, 1, 64, 0, out.data());
}
void missing_syncwarp() {
  std::vector<int> out(64);
  simt::launch_checked({region(out, "out")}, k_warp_exchange<false>, 1, 64, 0, out.data());
}
void uninit_static_smem() {
  std::vector<float> out(64);
  simt::launch_checked({region(out, "out")}, k_uninit_static, 1, 64, 0, out.data());
}
void uninit_dynamic_smem() {
  std::vector<float> out(64);
  simt::launch_checked({region(out, "out")}, k_uninit_dynamic, 1, 64, 64 * sizeof(float),
                       out.data());
}
void blockscan_reuse_without_sync() {
  std::vector<int> out(2 * 256);
  simt::launch_checked({region(out, "out")}, k_block_scan_twice<256, false>, 1, 256, 0, out.data());
}
void divergent_syncthreads() { simt::launch(k_divergent_syncthreads, 1, 64, 0); }
void divergent_syncwarp() { simt::launch(k_divergent_syncwarp, 1, 32, 0); }
void deadlock() {
  std::vector<int> out(64);
  simt::launch(k_deadlock, 1, 64, 0, out.data());
}
void livelock() {
  simt::Options o;
  o.max_rounds = 10000;
  simt::launch(o, k_spin_forever, 1, 32, 0);
}
void shfl_exited_lane() {
  std::vector<int> out(32);
  simt::launch(k_shfl_exited, 1, 32, 0, out.data());
}
void shfl_lane_outside_mask() {
  std::vector<int> out(32);
  simt::launch(k_shfl_outside_mask, 1, 32, 0, out.data());
}
void mask_without_caller() { simt::launch(k_mask_without_caller, 1, 32, 0); }
void shfl_partial_warp() {
  std::vector<int> out(48);
  simt::launch(k_shfl_full_mask, 1, 48, 0, out.data());
}
void masks_disagree() { simt::launch(k_masks_disagree, 1, 32, 0); }
void too_many_threads() { simt::launch(k_nothing, 1, 1025, 0); }
void block_dim_z_too_big() { simt::launch(k_nothing, 1, dim3(1, 1, 65), 0); }
void smem_over_sm80_optin() {
  simt::Options o;
  o.arch = simt::Arch::kSm80;
  simt::launch(o, k_nothing, 1, 32, 200 * 1024);
}
// Out of bounds: only an ASan build catches these (the process aborts with ASan's report).
void oob_global_write() {
  std::vector<int> out(63);  // one short
  simt::launch(k_write_tid, 1, 64, 0, out.data());
}
void oob_dynamic_smem() { simt::launch(k_dynamic_smem_overflow, 1, 64, 63 * sizeof(int)); }
void oob_static_smem() { simt::launch(k_static_smem_overflow, 1, 64, 0); }
// The process exits with status 3 and a message (ASan builds: ASan's stack-overflow report).
void stack_overflow() {
  std::vector<int> out(32);
  simt::launch(k_deep_recursion, 1, 32, 0, out.data());
}

// ---- correct kernels that must pass -------------------------------------------------------------

void block_exchange() {
  std::vector<int> out(64);
  simt::launch_checked({region(out, "out")}, k_block_exchange<true>, 1, 64, 0, out.data());
  for (int i = 0; i < 64; ++i) expect(out[i] == ((i + 1) % 64) * 3, "exchanged value");
}
void warp_exchange() {
  std::vector<int> out(64);
  simt::launch_checked({region(out, "out")}, k_warp_exchange<true>, 1, 64, 0, out.data());
  for (int i = 0; i < 64; ++i) expect(out[i] == (i / 32) * 1000 + 31 - i % 32, "warp exchange");
}
void block_reduce() {
  const int n = 3 * 256 + 17;
  std::vector<float> x(n), out(3 + 1);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7);
  simt::launch_checked({region(out, "out")}, k_block_reduce, 4, 256, 256 * sizeof(float), x.data(),
                       n, out.data());
  for (int b = 0; b < 4; ++b) {
    float want = 0;
    for (int i = b * 256; i < n && i < (b + 1) * 256; ++i) want += x[i];
    expect(out[b] == want, "block sum " + std::to_string(b));
  }
}
void warp_reductions() {
  std::vector<int> out(6 * 64);
  simt::launch_checked({region(out, "out")}, k_warp_reductions, 1, 64, 0, out.data());
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, w = t / 32, base = w * 32;
    const int* o = &out[t * 6];
    expect(o[0] == 32 * base + 496, "xor butterfly sum");
    if (lane == 0) expect(o[1] == 32 * base + 496, "down-reduction sum at lane 0");
    expect(o[2] == (lane + 1) * base + lane * (lane + 1) / 2, "shfl_up inclusive scan");
    expect(o[3] == base + (lane / 8) * 8 + 3, "width-8 broadcast of lane 3");
    expect(o[4] == (lane ^ 4) + base, "xor 4 within width 8");
    expect(o[5] == (lane + 4 < 32 ? lane + 4 : lane) + base, "shfl_down by 4 keeps the top");
  }
}
void votes_and_match() {
  std::vector<unsigned> out(5 * 32);
  simt::launch_checked({region(out, "out")}, k_votes_and_match, 1, 32, 0, out.data());
  for (int l = 0; l < 32; ++l) {
    unsigned group = 0;
    for (int j = 0; j < 32; ++j)
      if (j % 5 == l % 5) group |= 1u << j;
    const unsigned* o = &out[l * 5];
    expect(o[0] == 0x55555555u, "ballot of even lanes");
    expect(o[1] == 1 && o[2] == 0, "any / all");
    expect(o[3] == group, "__match_any_sync groups lanes with equal values");
    expect(o[4] == 32 * 31 / 2, "__reduce_add_sync");
  }
}
void block_scan() {
  const int n = 3000;
  std::vector<int> x(n), excl(n), offs(n);
  for (int i = 0; i < n; ++i) x[i] = (i * 7) % 11;
  simt::launch_checked({region(excl, "excl"), region(offs, "offs")}, k_block_scan_loop<1024>, 1,
                       1024, 0, x.data(), n, excl.data(), offs.data());
  int acc = 0;
  for (int i = 0; i < n; ++i) {
    expect(excl[i] == acc, "exclusive sum at " + std::to_string(i));
    acc += x[i];
    expect(offs[i] == acc, "inclusive end at " + std::to_string(i));
  }
}
void block_scan_reuse_with_sync() {
  std::vector<int> out(2 * 256);
  simt::launch_checked({region(out, "out")}, k_block_scan_twice<256, true>, 1, 256, 0, out.data());
  for (int t = 0; t < 256; ++t) {
    expect(out[t] == t, "first scan");
    expect(out[256 + t] == 2 * t, "second scan");
  }
}
void atomics_histogram() {
  const int n = 5000, bins = 37;
  std::vector<int> ids(n), hist(bins), maxid(1, -1);
  for (int i = 0; i < n; ++i) ids[i] = (i * 13) % bins;
  simt::launch_checked({region(hist, "hist"), region(maxid, "max")}, k_histogram, 3, 128,
                       bins * sizeof(int), ids.data(), n, bins, hist.data(), maxid.data());
  std::vector<int> want(bins);
  for (int i = 0; i < n; ++i) ++want[ids[i]];
  expect(hist == want, "histogram");
  expect(maxid[0] == bins - 1, "atomicMax");
}
void exited_threads_count_as_arrived() {
  std::vector<int> out(64, -1);
  simt::launch_checked({region(out, "out")}, k_early_exit, 1, 64, 0, out.data());
  for (int i = 0; i < 64; ++i) expect(out[i] == (i < 40 ? 40 + 7 : -1), "after early exit");
}
void block_3d_and_grid() {
  const dim3 grid(3, 2, 2), block(8, 4, 2);
  std::vector<int> out(12 * 64 * 4);
  simt::launch_checked({region(out, "out")}, k_indices, grid, block, 0, out.data());
  for (int b = 0; b < 12; ++b)
    for (int t = 0; t < 64; ++t) {
      const int* o = &out[(b * 64 + t) * 4];
      expect(o[0] == b && o[1] == t && o[2] == 64 && o[3] == 12,
             "built-ins of block " + std::to_string(b) + " thread " + std::to_string(t));
    }
}
void syncthreads_count_and_or() {
  std::vector<int> out(3 * 96);
  simt::launch_checked({region(out, "out")}, k_sync_count, 1, 96, 0, out.data());
  for (int t = 0; t < 96; ++t)
    expect(out[3 * t] == 32 && out[3 * t + 1] == 0 && out[3 * t + 2] == 1, "count/and/or");
}
void sm90_allows_200kb() { simt::launch(k_nothing, 1, 32, 200 * 1024); }
// DeviceRadixSort: stable by the key bits asked for; the DoubleBuffer result lands where CUB's
// last digit pass would put it (5 passes of 8 bits for 36 bits: flipped; 4 for 32: not), and the
// other buffer holds poison.
void cub_device_sort_and_scan() {
  const int n = 1000;
  for (const int end_bit : {32, 36}) {
    std::vector<uint64_t> k0(n), k1(n);
    std::vector<int32_t> v0(n), v1(n);
    for (int i = 0; i < n; ++i) {
      k0[i] = (uint64_t(i % 3) << 32) | uint64_t((i * 37) % 11);
      v0[i] = i;
    }
    const std::vector<uint64_t> keys = k0;
    cub::DoubleBuffer<uint64_t> kb(k0.data(), k1.data());
    cub::DoubleBuffer<int32_t> vb(v0.data(), v1.data());
    size_t bytes = 0;
    expect(cub::DeviceRadixSort::SortPairs(nullptr, bytes, kb, vb, n, 0, end_bit) == cudaSuccess,
           "size query");
    std::vector<char> temp(bytes);
    expect(
        cub::DeviceRadixSort::SortPairs(temp.data(), bytes, kb, vb, n, 0, end_bit) == cudaSuccess,
        "sort");
    expect(kb.selector == (end_bit == 36 ? 1 : 0) && vb.selector == kb.selector, "selector");
    const uint64_t mask = end_bit == 64 ? ~0ull : (1ull << end_bit) - 1;
    for (int i = 1; i < n; ++i) {
      const int a = vb.Current()[i - 1], b = vb.Current()[i];
      const uint64_t ka = keys[a] & mask, kb2 = keys[b] & mask;
      expect(ka < kb2 || (ka == kb2 && a < b), "stable order at " + std::to_string(i));
      expect(kb.Current()[i] == keys[b], "keys follow values");
    }
    expect(vb.Alternate()[0] == int32_t(0xA5A5A5A5), "the other buffer is poisoned");
  }
  std::vector<int> x(100), y(100);
  for (int i = 0; i < 100; ++i) x[i] = i % 7;
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, x.data(), y.data(), 100);
  std::vector<char> temp(bytes);
  cub::DeviceScan::ExclusiveSum(temp.data(), bytes, x.data(), y.data(), 100);
  for (int i = 0, acc = 0; i < 100; acc += x[i], ++i) expect(y[i] == acc, "DeviceScan");
}
void lowp_conversions() {
  const std::string err = check_lowp_conversions();
  expect(err.empty(), err);
}

enum class Kind {
  kInProcess,  // run with the others
  kAsan,       // ASan ends the process: run by name, in an ASan build only
  kExit,       // ends the process (stack overflow): run by name
};

struct Case {
  const char* name;
  void (*run)();
  const char* fault;  // nullptr: must pass; else a substring of the harness's error
  Kind kind = Kind::kInProcess;
};

const Case kCases[] = {
    {"missing_syncthreads", missing_syncthreads, "wrote different bits"},
    {"missing_syncwarp", missing_syncwarp, "wrote different bits"},
    {"uninit_static_smem", uninit_static_smem, "wrote different bits"},
    {"uninit_dynamic_smem", uninit_dynamic_smem, "wrote different bits"},
    {"blockscan_reuse_without_sync", blockscan_reuse_without_sync, "wrote different bits"},
    {"divergent_syncthreads", divergent_syncthreads, "divergent __syncthreads"},
    {"divergent_syncwarp", divergent_syncwarp, "divergent __syncwarp"},
    {"deadlock", deadlock, "deadlock"},
    {"livelock", livelock, "scheduling rounds"},
    {"shfl_exited_lane", shfl_exited_lane, "names lane 5, which has exited"},
    {"shfl_lane_outside_mask", shfl_lane_outside_mask, "which is not in the mask"},
    {"mask_without_caller", mask_without_caller, "does not include the calling lane"},
    {"shfl_partial_warp", shfl_partial_warp, "does not exist"},
    {"masks_disagree", masks_disagree, "passes mask"},
    {"too_many_threads", too_many_threads, "at most 1024 threads"},
    {"block_dim_z_too_big", block_dim_z_too_big, "at most 1024 threads"},
    {"smem_over_sm80_optin", smem_over_sm80_optin, "sm_80 opt-in limit"},
    {"oob_global_write", oob_global_write, "AddressSanitizer", Kind::kAsan},
    {"oob_dynamic_smem", oob_dynamic_smem, "AddressSanitizer", Kind::kAsan},
    {"oob_static_smem", oob_static_smem, "AddressSanitizer", Kind::kAsan},
    {"stack_overflow", stack_overflow, "overflowed its stack", Kind::kExit},
    {"block_exchange", block_exchange, nullptr},
    {"warp_exchange", warp_exchange, nullptr},
    {"block_reduce", block_reduce, nullptr},
    {"warp_reductions", warp_reductions, nullptr},
    {"votes_and_match", votes_and_match, nullptr},
    {"block_scan", block_scan, nullptr},
    {"block_scan_reuse_with_sync", block_scan_reuse_with_sync, nullptr},
    {"atomics_histogram", atomics_histogram, nullptr},
    {"exited_threads_count_as_arrived", exited_threads_count_as_arrived, nullptr},
    {"block_3d_and_grid", block_3d_and_grid, nullptr},
    {"syncthreads_count_and_or", syncthreads_count_and_or, nullptr},
    {"sm90_allows_200kb", sm90_allows_200kb, nullptr},
    {"lowp_conversions", lowp_conversions, nullptr},
    {"cub_device_sort_and_scan", cub_device_sort_and_scan, nullptr},
};

// Runs one case; true if it behaved as expected.
bool run_case(const Case& c) {
  std::string status, detail;
  if (c.kind == Kind::kAsan) {
#ifndef SIMT_ASAN
    std::printf("CASE %s SKIP needs an AddressSanitizer build\n", c.name);
    return true;
#endif
  }
  try {
    c.run();
    status = c.fault ? "MISSED" : "PASS";
  } catch (const simt::Error& e) {
    detail = e.what();
    const bool ok = c.fault && std::strstr(e.what(), c.fault) != nullptr;
    status = ok ? "CAUGHT" : c.fault ? "MISSED" : "FAIL";
  } catch (const Fail& f) {
    detail = f.msg;
    status = "FAIL";
  }
  std::printf("CASE %s %s %s\n", c.name, status.c_str(), detail.c_str());
  std::fflush(stdout);
  return status == "PASS" || status == "CAUGHT";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {
    for (const Case& c : kCases)
      std::printf("%s %s\n", c.name,
                  c.kind == Kind::kAsan   ? "asan"
                  : c.kind == Kind::kExit ? "exit"
                  : c.fault               ? "fault"
                                          : "pass");
    return 0;
  }
  bool all_ok = true, found = argc == 1;
  for (const Case& c : kCases) {
    if (argc > 1 && std::strcmp(argv[1], c.name) != 0) continue;
    if (argc == 1 && c.kind != Kind::kInProcess) {  // ends the process: one per process
      std::printf("CASE %s SKIP run it by name\n", c.name);
      continue;
    }
    found = true;
    all_ok = run_case(c) && all_ok;
  }
  if (!found) std::printf("no case named %s\n", argv[1]);
  return all_ok && found ? 0 : 1;
}
