// SIMT harness: fibers. Every CUDA thread of the running block is a fiber with its own small
// stack; the scheduler (simt_block.h) runs on the OS thread's own stack and switches into a fiber
// until it reaches a barrier, a warp collective or its end.
//
// Two ways to switch: on x86-64 a hand-written swap of the callee-saved registers (~5 ns); elsewhere,
// or with -DSIMT_FIBER_UCONTEXT, ucontext's swapcontext (~250 ns: a sigprocmask syscall per
// switch). A warp shuffle costs 64 switches, so the router kernel's tests run ~30x faster on the
// first. AddressSanitizer builds annotate every switch (__sanitizer_start/finish_switch_fiber), so
// ASan tracks fiber stacks as it does thread stacks. Stacks are mmap'd with a PROT_NONE guard page
// below them (an overflow is reported at once, see on_segv) and reused across blocks and launches.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#ifdef SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(SIMT_FIBER_UCONTEXT) && !defined(__x86_64__)
#define SIMT_FIBER_UCONTEXT 1
#endif

#ifdef SIMT_FIBER_UCONTEXT
#include <ucontext.h>
#else
// simt_ctx_switch(save, to): pushes the callee-saved registers and the SSE/x87 control words,
// stores the stack pointer in *save, loads `to` and pops the same frame from there. Weak and in
// its own COMDAT section, so every translation unit that includes this header may define it.
extern "C" void simt_ctx_switch(void** save, void* to);
asm(R"(
  .pushsection .text.simt_ctx_switch,"axG",@progbits,simt_ctx_switch,comdat
  .weak simt_ctx_switch
  .hidden simt_ctx_switch
  .type simt_ctx_switch,@function
simt_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_ctx_switch, .-simt_ctx_switch
  .popsection
)");
#endif

namespace simt::detail {

// A fiber stack: [base, base + size), with a guard page just below base.
struct Stack {
  char* base = nullptr;
  size_t size = 0;
};

inline Stack map_stack(size_t size) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size = (size + page - 1) / page * page;
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, page, PROT_NONE);
  return {static_cast<char*>(p) + page, size};
}

// Where a suspended context resumes.
struct Context {
#ifdef SIMT_FIBER_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

inline void switch_context(Context& save, Context& to) {
#ifdef SIMT_FIBER_UCONTEXT
  swapcontext(&save.uc, &to.uc);
#else
  simt_ctx_switch(&save.sp, to.sp);
#endif
}

// Prepares c to run entry() (which must never return) on s at the first switch into it.
inline void make_context(Context& c, Stack s, void (*entry)()) {
#ifdef SIMT_ASAN
  ASAN_UNPOISON_MEMORY_REGION(s.base, s.size);  // frames a previous fiber left behind
#endif
#ifdef SIMT_FIBER_UCONTEXT
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = s.base;
  c.uc.uc_stack.ss_size = s.size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#else
  // The frame simt_ctx_switch pops: control words, r15..r12, rbx, rbp, then `ret` into entry
  // with the stack as if entry had been called (rsp + 8 16-byte aligned).
  auto* p = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(s.base) + s.size) & ~15ull);
  *--p = 0;  // entry's return address: it never returns
  *--p = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--p = 0;
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fcw));
  *--p = mxcsr | (static_cast<uint64_t>(fcw) << 32);
  c.sp = p;
#endif
}

// One fiber and the bookkeeping of the switches into and out of it.
struct Fiber {
  Context ctx;
  Stack stack;
  void* asan_fake = nullptr;  // ASan's fake stack of this fiber while it is switched out
};

// The OS thread's side: its context and (ASan) its stack bounds, learnt at the first switch.
struct Host {
  Context ctx;
  const void* bottom = nullptr;
  size_t size = 0;

  // Host -> f; returns when f yields or finishes.
  void resume(Fiber& f) {
#ifdef SIMT_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack.base, f.stack.size);
    switch_context(ctx, f.ctx);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    switch_context(ctx, f.ctx);
#endif
  }
  // First thing a fiber does, and after every switch back into it.
  void entered(Fiber& f) {
#ifdef SIMT_ASAN
    __sanitizer_finish_switch_fiber(f.asan_fake, &bottom, &size);
#else
    (void)f;
#endif
  }
  // f -> host; returns when the host resumes f.
  void yield(Fiber& f) {
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(&f.asan_fake, bottom, size);
#endif
    switch_context(f.ctx, ctx);
    entered(f);
  }
  // f -> host for good (f's stack may be reused at once).
  [[noreturn]] void finish(Fiber& f) {
#ifdef SIMT_ASAN
    __sanitizer_start_switch_fiber(nullptr, bottom, size);
#endif
    switch_context(f.ctx, ctx);
    __builtin_unreachable();
  }
};

struct StackPool;
inline thread_local const StackPool* tl_stack_pool = nullptr;  // for the overflow handler
inline void install_overflow_handler();

// Stacks of the fibers, kept for the next block and launch (per OS thread).
struct StackPool {
  std::vector<Stack> stacks;
  size_t size = 0;

  void reserve(size_t n, size_t bytes) {
    if (bytes != size) release();
    size = bytes;
    while (stacks.size() < n) stacks.push_back(map_stack(bytes));
    tl_stack_pool = this;
    install_overflow_handler();
  }
  void release() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (Stack& s : stacks) munmap(s.base - page, s.size + page);
    stacks.clear();
  }
  ~StackPool() {
    release();
    tl_stack_pool = nullptr;
  }
};

// A fiber that overflows its stack faults on the guard page below it. Without ASan (which
// reports stack overflows itself), a SIGSEGV handler on an alternate stack says so and exits with
// status 3; any other SIGSEGV goes back to the previous handler.
inline struct sigaction g_previous_segv;

inline void on_segv(int, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (const StackPool* pool = tl_stack_pool) {
    for (const Stack& st : pool->stacks) {
      const auto base = reinterpret_cast<uintptr_t>(st.base);
      if (addr >= base - page && addr < base) {
        static const char kMsg[] =
            "simt: a fiber overflowed its stack (raise simt::Options::stack_bytes)\n";
        (void)!write(2, kMsg, sizeof kMsg - 1);
        _exit(3);
      }
    }
  }
  sigaction(SIGSEGV, &g_previous_segv, nullptr);  // not ours: fault again, as before
}

inline void install_overflow_handler() {
#ifndef SIMT_ASAN
  static thread_local bool installed = false;
  if (installed) return;
  installed = true;
  static thread_local char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_previous_segv);
#endif
}

}  // namespace simt::detail
