// The emulator's scheduler: the threads of one block as fibers on the calling
// OS thread, run in turns from one synchronisation point to the next (see
// include/dnnrl_cuda_emu.h for what is and is not modelled).
#include <cuda_runtime.h>  // the emulator's (include/cuda_runtime.h)

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <vector>

// ---------------------------------------------------------------- fiber switch
// x86-64: a hand-written switch of the callee-saved registers and the stack pointer, about
// 20x cheaper than swapcontext, which makes two system calls (the signal mask) per switch
// and dominated the emulator's time (64 switches per wmma::mma_sync). Elsewhere: ucontext.
#if defined(__x86_64__) && defined(__linux__)
#define DNNRL_EMU_ASM_SWITCH 1
extern "C" void dnnrl_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl dnnrl_emu_switch
  .hidden dnnrl_emu_switch
  .type dnnrl_emu_switch,@function
dnnrl_emu_switch:
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
  .size dnnrl_emu_switch, .-dnnrl_emu_switch
)");
#endif

namespace dnnrl_emu {
namespace {

struct Context {
#ifdef DNNRL_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  const void* stack_lo = nullptr;  // for AddressSanitizer's fiber annotations
  size_t stack_bytes = 0;
  void* fake_stack = nullptr;
};

// AddressSanitizer must be told which stack is current (its checks of stack memory and of
// exceptions use the bounds): each switch is announced, and completed on the other side.
#if defined(__SANITIZE_ADDRESS__)
#define DNNRL_EMU_ASAN 1
}  // namespace
}  // namespace dnnrl_emu
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
namespace dnnrl_emu {
namespace {
#endif

// Save the running context into `from` and resume `to`. Stack bounds: the fibers'
// (lo, bytes); the scheduler's are learnt from the first switch into a fiber.
inline void switch_context(Context& from, Context& to) {
#ifdef DNNRL_EMU_ASAN
  __sanitizer_start_switch_fiber(&from.fake_stack, to.stack_lo, to.stack_bytes);
#endif
#ifdef DNNRL_EMU_ASM_SWITCH
  dnnrl_emu_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#ifdef DNNRL_EMU_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

// A fresh context that starts `fn` (which must never return) on the stack [lo, lo + bytes).
inline void make_context(Context& c, char* lo, size_t bytes, void (*fn)()) {
  c.stack_lo = lo;
  c.stack_bytes = bytes;
#ifdef DNNRL_EMU_ASAN
  // the frames of the fiber that last used this stack never returned: clear their redzones
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  __asan_unpoison_memory_region(lo + page, bytes - page);
#endif
#ifdef DNNRL_EMU_ASM_SWITCH
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(lo + bytes)) & ~uintptr_t(15));
  // The frame dnnrl_emu_switch pops: control words, r15 .. rbp, then `ret` into fn, with the
  // stack as a call would leave it (rsp = 8 mod 16 at fn's entry).
  top[-1] = 0;                                   // fn's return address: never used
  top[-2] = reinterpret_cast<uint64_t>(fn);      // popped by ret
  for (int i = 3; i <= 8; ++i) top[-i] = 0;      // rbp, rbx, r12, r13, r14, r15
  top[-9] = 0x1F80ull | (0x037Full << 32);       // mxcsr (default), x87 control word (default)
  c.sp = top - 9;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fn, 0);
#endif
}

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

enum class State { Runnable, AtBarrier, AtWarpOp, Done };

struct Thread {
  Context ctx;
  char* stack = nullptr;
  int tid = 0;
  State state = State::Runnable;
  // barrier
  const char* file = nullptr;
  int line = 0;
  int pred = 0, pred_out = 0;
  // warp collective
  unsigned mask = 0;
  CompleteFn complete = nullptr;
  void* arg = nullptr;
  const char* kind = nullptr;
  // cp.async: the open (uncommitted) group and the committed ones, oldest first
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

struct Grid {
  dim3 grid, block;
  uint3 bidx;
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> smem_store;
  unsigned char* smem = nullptr;  // 128-byte aligned, as the kernels declare it
  size_t smem_bytes = 0;
  uint64_t block_serial = 0;
  std::vector<Thread> threads;
  Context sched;
  Thread* cur = nullptr;
  std::string error;
};

std::mutex g_launch_mu;  // one launch at a time: the state below is the running block's
Grid* g = nullptr;
uint64_t g_serial = 0;
char* g_stacks = nullptr;
std::map<const void*, uint64_t> g_shared_poisoned;  // static __shared__ address -> block serial
std::string g_last_error;

char* stacks() {
  if (g_stacks == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("dnnrl_emu: cannot map the fiber stacks");
    g_stacks = static_cast<char*>(p);
    // A guard page at the low end of every stack: an overflow faults instead of writing into a neighbour.
    for (int t = 0; t < kMaxThreads; ++t) mprotect(g_stacks + t * kStackBytes, page, PROT_NONE);
  }
  return g_stacks;
}

Thread& cur() {
  if (g == nullptr || g->cur == nullptr)
    throw std::runtime_error("dnnrl_emu: device code called outside a kernel launch");
  return *g->cur;
}

std::string where(const Thread& t) {
  const uint3 b = g->bidx;
  return "block (" + std::to_string(b.x) + "," + std::to_string(b.y) + "," + std::to_string(b.z) + ") thread " +
         std::to_string(t.tid);
}

std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t s = f.find_last_of('/');
  if (s != std::string::npos) f = f.substr(s + 1);
  return f + ":" + std::to_string(line);
}

void yield() {
  Thread& t = cur();
  switch_context(t.ctx, g->sched);
}

void perform(std::vector<Copy>& copies) {
  for (const Copy& c : copies) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
  copies.clear();
}

void flush_copies(Thread& t) {
  for (auto& grp : t.groups) perform(grp);
  t.groups.clear();
  perform(t.open);
}

void entry() {
#ifdef DNNRL_EMU_ASAN
  // the first switch into this fiber: complete it, and learn the scheduler's stack bounds
  __sanitizer_finish_switch_fiber(nullptr, &g->sched.stack_lo, &g->sched.stack_bytes);
#endif
  Thread& t = cur();
  try {
    (*g->body)();
  } catch (const std::exception& e) {
    if (g->error.empty()) g->error = where(t) + ": " + e.what();
  } catch (...) {
    if (g->error.empty()) g->error = where(t) + ": unknown exception";
  }
  flush_copies(t);
  t.state = State::Done;
  switch_context(t.ctx, g->sched);  // never resumed
}

enum class Order { Forward, Reverse, Random };

struct Schedule {
  Order order = Order::Forward;
  uint64_t seed = 0;
};

Schedule read_schedule() {
  Schedule s;
  const char* v = std::getenv("DNNRL_EMU_SCHEDULE");
  if (v == nullptr || !*v || std::string(v) == "forward") return s;
  const std::string str(v);
  if (str == "reverse") {
    s.order = Order::Reverse;
    return s;
  }
  if (str.rfind("random:", 0) == 0) {
    s.order = Order::Random;
    s.seed = std::strtoull(str.c_str() + 7, nullptr, 10);
    return s;
  }
  throw std::runtime_error("DNNRL_EMU_SCHEDULE must be forward, reverse or random:SEED, got '" + str + "'");
}

// Complete every warp collective whose lanes have all arrived; false if none could.
bool resolve_warps(int nthreads) {
  bool any = false;
  for (int w0 = 0; w0 < nthreads; w0 += 32) {
    const int nl = std::min(32, nthreads - w0);
    for (int l = 0; l < nl; ++l) {
      Thread& t = g->threads[w0 + l];
      if (t.state != State::AtWarpOp) continue;
      const unsigned mask = t.mask;
      if (!(mask >> l & 1u))
        fail(where(t) + ": " + t.kind + " at " + site(t.file, t.line) +
             " with a mask that leaves out the calling lane");
      bool ready = true;
      void* args[32] = {nullptr};
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        if (m >= nl)
          fail(where(t) + ": " + t.kind + " names lane " + std::to_string(m) + ", past the block's last thread");
        Thread& o = g->threads[w0 + m];
        if (o.state == State::Done)
          fail(where(t) + ": " + t.kind + " at " + site(t.file, t.line) + " waits for lane " + std::to_string(m) +
               ", which has exited");
        if (o.state != State::AtWarpOp) {
          ready = false;
          continue;
        }
        if (o.mask != mask || o.complete != t.complete || o.kind != t.kind)
          fail(where(t) + ": " + t.kind + " at " + site(t.file, t.line) + " (mask " + std::to_string(mask) +
               ") meets " +
               o.kind + " at " + site(o.file, o.line) + " (mask " + std::to_string(o.mask) + ") in lane " +
               std::to_string(m) + ": divergent warp collectives");
        args[m] = o.arg;
      }
      if (!ready) continue;
      t.complete(args, mask);
      for (int m = 0; m < 32; ++m)
        if (mask >> m & 1u) g->threads[w0 + m].state = State::Runnable;
      any = true;
    }
  }
  return any;
}

void run_block(int nthreads, const Schedule& sch, std::mt19937_64& rng) {
  char* st = stacks();
  g->threads.assign(nthreads, Thread());
  for (int t = 0; t < nthreads; ++t) {
    Thread& th = g->threads[t];
    th.tid = t;
    th.stack = st + t * kStackBytes;
    make_context(th.ctx, th.stack, kStackBytes, &entry);
  }
  std::vector<int> order(nthreads);
  for (int t = 0; t < nthreads; ++t) order[t] = sch.order == Order::Reverse ? nthreads - 1 - t : t;
  while (true) {
    if (sch.order == Order::Random) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int t : order) {
      Thread& th = g->threads[t];
      if (th.state != State::Runnable) continue;
      g->cur = &th;
      switch_context(g->sched, th.ctx);
      g->cur = nullptr;
      ran = true;
      if (!g->error.empty()) throw std::runtime_error("dnnrl_emu: " + g->error);
    }
    if (resolve_warps(nthreads)) continue;
    if (ran) continue;
    // Nothing runnable and no collective can complete: a barrier of every live thread, or a deadlock.
    int live = 0, at_barrier = 0;
    const Thread* first = nullptr;
    for (Thread& th : g->threads) {
      if (th.state == State::Done) continue;
      ++live;
      if (th.state == State::AtBarrier) {
        ++at_barrier;
        if (first == nullptr) first = &th;
      }
    }
    if (live == 0) return;
    if (at_barrier != live) {
      for (Thread& th : g->threads)
        if (th.state == State::AtWarpOp)
          fail(where(th) + ": " + th.kind + " at " + site(th.file, th.line) +
               " can never complete (a lane of its mask waits at __syncthreads or elsewhere): deadlock");
      fail("dnnrl_emu: deadlock");
    }
    int any = 0;
    for (Thread& th : g->threads) {
      if (th.state != State::AtBarrier) continue;
      if (th.file != first->file || th.line != first->line)
        fail(where(th) + " waits at __syncthreads at " + site(th.file, th.line) + " while " + where(*first) +
             " waits at " + site(first->file, first->line) + ": divergent barriers");
      any |= th.pred;
    }
    for (Thread& th : g->threads)
      if (th.state == State::AtBarrier) {
        th.pred_out = any;
        th.state = State::Runnable;
      }
  }
}

}  // namespace

void fail(const std::string& what) {
  if (g != nullptr && g->cur != nullptr) {
    Thread& t = *g->cur;
    if (g->error.empty()) g->error = what.rfind("block (", 0) == 0 ? what : where(t) + ": " + what;
    t.state = State::Done;
    switch_context(t.ctx, g->sched);  // never resumed
  }
  throw std::runtime_error("dnnrl_emu: " + what);
}

uint3 thread_idx() {
  const Thread& t = cur();
  const unsigned bx = g->block.x, by = g->block.y;
  return make_uint3(t.tid % bx, (t.tid / bx) % by, t.tid / (bx * by));
}
uint3 block_idx() { return g->bidx; }
dim3 block_dim() { return g->block; }
dim3 grid_dim() { return g->grid; }
int lane_id() { return cur().tid % 32; }

void syncthreads(const char* file, int line) { syncthreads_or(0, file, line); }

int syncthreads_or(int pred, const char* file, int line) {
  Thread& t = cur();
  t.state = State::AtBarrier;
  t.file = file;
  t.line = line;
  t.pred = pred;
  yield();
  return t.pred_out;
}

void warp_collective(unsigned mask, CompleteFn complete, void* arg, const char* kind, const char* file, int line) {
  Thread& t = cur();
  t.state = State::AtWarpOp;
  t.mask = mask;
  t.complete = complete;
  t.arg = arg;
  t.kind = kind;
  t.file = file;
  t.line = line;
  yield();
}

void cp_async16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async of 16 bytes with an address that is not 16-byte aligned");
  const unsigned char* lo = g->smem;
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < lo || d + 16 > lo + g->smem_bytes) fail("cp.async destination outside the block's dynamic shared memory");
  cur().open.push_back(Copy{dst, src, valid});
}
void cp_async_commit() {
  Thread& t = cur();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
void cp_async_wait(int newest_left) {
  Thread& t = cur();
  const int n = static_cast<int>(t.groups.size());
  const int done = std::max(0, n - newest_left);
  for (int i = 0; i < done; ++i) perform(t.groups[i]);
  t.groups.erase(t.groups.begin(), t.groups.begin() + done);
}

void* dynamic_smem() { return g->smem; }

void shared_decl(void* p, size_t bytes) {
  auto it = g_shared_poisoned.find(p);
  if (it != g_shared_poisoned.end() && it->second == g->block_serial) return;
  std::memset(p, 0xFF, bytes);
  g_shared_poisoned[p] = g->block_serial;
}

void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mu);
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  g_last_error.clear();
  try {
    if (nthreads == 0 || nthreads > kMaxThreads)
      throw std::runtime_error("launch with " + std::to_string(nthreads) + " threads per block (1..1024 allowed)");
    if (grid.y > 65535 || grid.z > 65535 || nblocks == 0)
      throw std::runtime_error("launch with a grid of (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                               std::to_string(grid.z) + ") blocks");
    if (smem > dynamic_smem_limit(kernel))
      throw std::runtime_error("launch with " + std::to_string(smem) +
                               " bytes of dynamic shared memory above the kernel's limit (cudaFuncSetAttribute)");
  } catch (const std::exception& e) {
    g_last_error = e.what();
    throw std::runtime_error(std::string("dnnrl_emu: ") + e.what());
  }
  Grid state;
  state.grid = grid;
  state.block = block;
  state.body = &body;
  state.smem_store.assign(smem + 256, 0xFF);
  state.smem = state.smem_store.data() + (128 - reinterpret_cast<uintptr_t>(state.smem_store.data()) % 128) % 128;
  state.smem_bytes = smem;
#ifdef DNNRL_EMU_ASAN
  // memcheck: the padding around the dynamic shared memory is out of bounds
  unsigned char* lo = state.smem_store.data();
  unsigned char* hi = lo + state.smem_store.size();
  __asan_poison_memory_region(lo, static_cast<size_t>(state.smem - lo));
  __asan_poison_memory_region(state.smem + smem, static_cast<size_t>(hi - (state.smem + smem)));
#endif
  const Schedule sch = read_schedule();
  std::mt19937_64 rng(sch.seed);
  g = &state;
  auto done = [&] {
    g = nullptr;
#ifdef DNNRL_EMU_ASAN
    __asan_unpoison_memory_region(lo, static_cast<size_t>(hi - lo));
#endif
  };
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          state.bidx = make_uint3(x, y, z);
          state.block_serial = ++g_serial;
          std::fill(state.smem, state.smem + smem, 0xFF);
          run_block(static_cast<int>(nthreads), sch, rng);
        }
  } catch (...) {
    done();
    throw;
  }
  done();
}

void launch_check() {}

const cudaDeviceProp* device_properties() {
  static cudaDeviceProp p = [] {
    cudaDeviceProp d;
    std::memset(&d, 0, sizeof(d));
    std::strcpy(d.name, "dnnrl_emu (H100 SXM numbers)");
    d.major = 9;
    d.minor = 0;
    d.multiProcessorCount = 132;
    d.sharedMemPerBlock = 48 * 1024;
    d.sharedMemPerBlockOptin = 232448;
    d.sharedMemPerMultiprocessor = 233472;
    d.maxThreadsPerMultiProcessor = 2048;
    d.maxThreadsPerBlock = 1024;
    d.warpSize = 32;
    d.regsPerMultiprocessor = 65536;
    return d;
  }();
  const char* sms = std::getenv("DNNRL_EMU_SMS");
  p.multiProcessorCount = (sms != nullptr && *sms) ? std::max(1, std::atoi(sms)) : 132;
  return &p;
}

namespace {
std::map<const void*, size_t> g_smem_limit;
std::mutex g_smem_mu;
}  // namespace

size_t dynamic_smem_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_smem_mu);
  auto it = g_smem_limit.find(kernel);
  return it == g_smem_limit.end() ? kDefaultDynamicSmem : it->second;
}
void set_dynamic_smem_limit(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_smem_mu);
  g_smem_limit[kernel] = static_cast<size_t>(bytes);
}

}  // namespace dnnrl_emu
