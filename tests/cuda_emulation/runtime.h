// CPU emulation of the CUDA device runtime, for tests only: it runs the *device code* of csrc/cuda/*.cu on a
// machine without a GPU. Compile a .cu file as plain C++:
//   g++ -x c++ -std=c++20 -DST_CUDA_EMULATION -Wno-unknown-pragmas -include tests/cuda_emulation/runtime.h f.cu
// and launch kernels with st_emu::launch(kernel, grid, block, /*shared_bytes=*/0, args...) instead of <<<>>>.
// (g++ 12 warns about `#pragma unroll` under -Wall and a pragma in this header cannot silence it.)
//
// Model: launch() runs the blocks one after another (blockIdx.x fastest, then y, then z) on the calling OS
// thread. A block's threads are cooperative fibers (POSIX ucontext) run from a run queue; a fiber gives up the
// CPU only when it waits at a barrier (__syncthreads or a warp shuffle) or returns. The last arrival at a
// barrier keeps running; the fibers it releases are queued by the block's schedule, deterministically:
//   round-robin: at the back of the queue (every fiber gets to its next barrier before a released one goes on);
//   warp-greedy: at the front, so the most recently released group runs first: a warp whose shuffle completes
//     runs on until it blocks at __syncthreads() or returns, before any other warp continues. This exposes a
//     missing __syncthreads() before shared memory is reused (e.g. a fast warp's second block reduction
//     overwriting scratch that a slow warp has yet to read for the first).
// Blocks with an even linear index (x + gridDim.x * (y + gridDim.y * z)) use round-robin, odd ones warp-greedy.
// The environment variable ST_EMU_SCHEDULE=round-robin|warp-greedy|alternate (default: alternate, as just
// described) selects it; it is read once per launch, and another value makes launch() throw. Fiber stacks
// (64 KiB plus a guard page) are mapped once per launch and reused by every block. The arguments are converted
// to the kernel's parameter types once and copied to every thread, like CUDA. __shared__ is `static`: blocks
// never overlap, so a function-local static acts as the block's shared memory (it is NOT reset between blocks
// or launches, and two OS threads must not run the same kernel at the same time).
//
// Strictness: launch() throws std::runtime_error naming the block and thread when a thread reaches
// __syncthreads() after a thread of its block returned, returns while others wait at __syncthreads(), or waits
// at another __syncthreads() call (source line) than the others; when a shuffle has a partial mask, runs in a
// partial warp, or a lane of the warp has exited (or exits while its warp-mates wait); on deadlock; on bad
// launch dimensions or shared_bytes != 0. An exception thrown by kernel code is caught in its fiber, the
// block's other fibers are unwound (their destructors run) and the exception is rethrown from launch().
//
// Limits: no atomics, no dynamic (extern) shared memory, no streams; a warp is 32 consecutive linear thread
// ids (x fastest); only __shfl_xor_sync among the warp intrinsics; accurate libm instead of --use_fast_math
// intrinsics; no race or memory-model checking beyond what the two schedules expose; no nested launches. Each
// fiber switch is a swapcontext (one sigprocmask syscall): expect roughly 1 us per thread per barrier.
#pragma once
#ifndef ST_CUDA_EMULATION
#define ST_CUDA_EMULATION 1
#endif
#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
constexpr int warpSize = 32;
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

namespace st_emu {
namespace detail {
constexpr size_t kStackBytes = 64 * 1024;
enum class State : unsigned char { Ready, AtBarrier, AtShuffle, Done };
struct Fiber { ucontext_t ctx; uint3 idx; State state; bool started; };
struct Warp { unsigned arrived, exited, gen; uint64_t buf[2][32]; };  // buf: shuffle slots, by generation parity
struct Abort {};  // unwinds the suspended fibers of an aborted block; deliberately not a std::exception

struct Launch {
  unsigned n = 0, cur = 0, arrived = 0, exited = 0, bar_line = 0;  // arrived, exited, bar_*: the block barrier
  const char* bar_file = "";
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned> queue;  // ring buffer of runnable fibers; a fiber is queued at most once
  unsigned head = 0, queued = 0;
  ucontext_t sched;  // the scheduler, i.e. the caller of launch()
  bool aborting = false, greedy = false;  // greedy: this block's schedule is warp-greedy
  std::exception_ptr error;
  void (*body)(void*);  // calls the kernel with a copy of the converted arguments
  void* body_arg;
  void push(unsigned i) { fibers[i].state = State::Ready, queue[(head + queued++) % n] = i; }
  void release(unsigned lo, unsigned hi) {  // makes fibers [lo, hi) except cur runnable, per the schedule
    if (!greedy) {
      for (unsigned i = lo; i < hi; ++i)
        if (i != cur) push(i);
      return;
    }
    for (unsigned i = hi; i-- > lo;)  // to the front, keeping their order: they run next, lowest id first
      if (i != cur) fibers[i].state = State::Ready, head = (head + n - 1) % n, queue[head] = i, ++queued;
  }
};

inline thread_local Launch* t_launch = nullptr;
constinit inline thread_local uint3 t_thread{0, 0, 0}, t_block{0, 0, 0};
constinit inline thread_local dim3 t_block_dim{}, t_grid_dim{};

inline std::string str(uint3 v) {
  char s[40];
  std::snprintf(s, sizeof s, "(%u,%u,%u)", v.x, v.y, v.z);
  return s;
}
[[noreturn]] inline void fail(const Launch& L, const std::string& what) {
  throw std::runtime_error("st_emu: block " + str(t_block) + " thread " + str(L.fibers[L.cur].idx) + ": " + what);
}
inline Launch& current(const char* fn) {
  if (!t_launch) throw std::runtime_error(std::string("st_emu: ") + fn + " called outside st_emu::launch");
  if (t_launch->aborting) throw Abort{};
  return *t_launch;
}
inline void suspend(Launch& L, State s) {  // to the scheduler, until another fiber releases this one
  L.fibers[L.cur].state = s;
  swapcontext(&L.fibers[L.cur].ctx, &L.sched);
  if (L.aborting) throw Abort{};
}

inline void sync_block(const std::source_location& loc) {
  Launch& L = current("__syncthreads()");
  if (L.exited)
    fail(L, "__syncthreads() reached after " + std::to_string(L.exited) + " thread(s) of the block returned (divergent barrier)");
  if (L.arrived == 0) {
    L.bar_file = loc.file_name(), L.bar_line = loc.line();
  } else if (L.bar_line != loc.line() || std::strcmp(L.bar_file, loc.file_name()) != 0) {
    fail(L, "waits at the __syncthreads() of " + std::string(loc.file_name()) + ":" + std::to_string(loc.line()) +
                ", others at " + L.bar_file + ":" + std::to_string(L.bar_line) + " (divergent barrier)");
  }
  if (++L.arrived < L.n) return suspend(L, State::AtBarrier);
  L.arrived = 0;  // the last arrival releases the others and keeps running
  L.release(0, L.n);
}

// Warp exchange: each lane stores v, waits for all 32 lanes, then reads lane src_of(lane)'s value. Slots are
// double-buffered by generation, so one barrier suffices: no lane can store for shuffle k+2 before every lane
// has arrived at shuffle k+1, i.e. has read its value of shuffle k.
template <typename T, typename F>
T shuffle(const char* fn, unsigned mask, T v, F src_of) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "st_emu: unsupported shuffle type");
  Launch& L = current(fn);
  const unsigned lane = L.cur & 31, w = L.cur >> 5;
  char hex[16];
  if (mask != 0xffffffffu && std::snprintf(hex, sizeof hex, "0x%08x", mask))
    fail(L, std::string(fn) + " with mask " + hex + "; only the full mask 0xffffffff is supported");
  if ((w + 1) * 32 > L.n)
    fail(L, std::string(fn) + " in partial warp " + std::to_string(w) + " of a " + std::to_string(L.n) +
                "-thread block (all 32 lanes must exist)");
  Warp& W = L.warps[w];
  if (W.exited) fail(L, std::string(fn) + " after " + std::to_string(W.exited) + " lane(s) of warp " + std::to_string(w) + " exited");
  const unsigned par = W.gen & 1;
  std::memcpy(&W.buf[par][lane], &v, sizeof(T));
  if (++W.arrived < 32) {
    suspend(L, State::AtShuffle);
  } else {
    W.arrived = 0, ++W.gen;
    L.release(w * 32, w * 32 + 32);
  }
  T r;
  std::memcpy(&r, &W.buf[par][src_of(lane) & 31], sizeof(T));
  return r;
}

inline void fiber_entry() {  // must not let an exception escape: it would cross swapcontext
  Launch& L = *t_launch;
  try {
    L.body(L.body_arg);
  } catch (const Abort&) {
  } catch (...) {
    if (!L.error) L.error = std::current_exception();
  }
  L.fibers[L.cur].state = State::Done;
  ++L.exited, ++L.warps[L.cur >> 5].exited;
  if (L.aborting || L.error) return;
  try {
    if (L.arrived) fail(L, "returned while " + std::to_string(L.arrived) + " thread(s) wait at __syncthreads() (divergent barrier)");
    if (const unsigned a = L.warps[L.cur >> 5].arrived)
      fail(L, "returned while " + std::to_string(a) + " lane(s) of its warp wait in a shuffle");
  } catch (...) {
    L.error = std::current_exception();
  }
}  // returns to L.sched through uc_link

inline void resume(Launch& L, unsigned i) {
  L.cur = i, t_thread = L.fibers[i].idx, L.fibers[i].started = true;
  swapcontext(&L.sched, &L.fibers[i].ctx);
}

inline std::string deadlock_message(const Launch& L) {
  unsigned shuffling = 0, first = L.n;
  for (unsigned i = L.n; i-- > 0;)
    if (L.fibers[i].state == State::AtShuffle) ++shuffling, first = i;
  return "st_emu: deadlock in block " + str(t_block) + ": no thread can make progress; " + std::to_string(L.arrived) +
         " wait at __syncthreads(), " + std::to_string(shuffling) + " in a shuffle (first: thread " +
         (first < L.n ? str(L.fibers[first].idx) : "-") + "), " + std::to_string(L.exited) + " returned";
}

inline void run_block(Launch& L, char* stacks, size_t slot) {
  L.arrived = L.exited = L.head = L.queued = 0;
  for (Warp& w : L.warps) w.arrived = w.exited = w.gen = 0;
  for (unsigned i = 0; i < L.n; ++i) {  // restart every fiber at fiber_entry, on its own stack
    Fiber& f = L.fibers[i];
    f.started = false;
    f.ctx.uc_stack.ss_sp = stacks + i * slot + (slot - kStackBytes);  // the guard page lies below
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &L.sched;
    makecontext(&f.ctx, fiber_entry, 0);
    L.push(i);
  }
  for (unsigned done = 0; done < L.n && !L.error;) {
    if (L.queued == 0) { L.error = std::make_exception_ptr(std::runtime_error(deadlock_message(L))); break; }
    const unsigned i = L.queue[L.head];
    L.head = (L.head + 1) % L.n, --L.queued;
    resume(L, i);
    done += L.fibers[i].state == State::Done;
  }
  if (!L.error) return;
  L.aborting = true;  // unwind every suspended fiber, then report
  for (unsigned i = 0; i < L.n; ++i)
    if (L.fibers[i].started && L.fibers[i].state != State::Done) resume(L, i);
  std::rethrow_exception(L.error);
}

[[gnu::noinline]] inline void init_context(ucontext_t& ctx) {  // apart from run(): getcontext returns twice
  if (getcontext(&ctx) != 0) throw std::runtime_error("st_emu::launch: getcontext failed");
}

enum class Schedule { RoundRobin, WarpGreedy, Alternate };
inline Schedule schedule_from_env() {
  const char* s = std::getenv("ST_EMU_SCHEDULE");
  if (!s || !*s || !std::strcmp(s, "alternate")) return Schedule::Alternate;
  if (!std::strcmp(s, "round-robin")) return Schedule::RoundRobin;
  if (!std::strcmp(s, "warp-greedy")) return Schedule::WarpGreedy;
  throw std::runtime_error(std::string("st_emu::launch: ST_EMU_SCHEDULE=") + s +
                           " (expected round-robin, warp-greedy or alternate)");
}

inline void run(dim3 grid, dim3 block, size_t shared_bytes, void (*body)(void*), void* arg) {
  const uint64_t n = uint64_t{block.x} * block.y * block.z;
  const auto dims = [&] { return " (grid " + str({grid.x, grid.y, grid.z}) + ", block " + str({block.x, block.y, block.z}) + ")"; };
  if (n == 0 || n > 1024 || block.z > 64) throw std::runtime_error("st_emu::launch: invalid block dimensions" + dims());
  if (!grid.x || !grid.y || !grid.z || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("st_emu::launch: invalid grid dimensions" + dims());
  if (shared_bytes) throw std::runtime_error("st_emu::launch: dynamic shared memory is not supported" + dims());
  if (t_launch) throw std::runtime_error("st_emu::launch: nested launches are not supported");
  const Schedule schedule = schedule_from_env();

  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), slot = kStackBytes + page;
  struct Stacks { void* p; size_t bytes; ~Stacks() { if (p != MAP_FAILED) munmap(p, bytes); } } stacks{mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0), n * slot};
  if (stacks.p == MAP_FAILED) throw std::runtime_error("st_emu::launch: cannot map fiber stacks");
  char* base = static_cast<char*>(stacks.p);
  for (size_t i = 0; i < n; ++i) mprotect(base + i * slot, page, PROT_NONE);
  Launch L;
  L.n = static_cast<unsigned>(n), L.body = body, L.body_arg = arg;
  L.fibers.resize(n), L.warps.resize((n + 31) / 32), L.queue.resize(n);
  for (unsigned i = 0; i < L.n; ++i) {
    L.fibers[i].idx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    init_context(L.fibers[i].ctx);
  }
  struct Reset { ~Reset() { t_launch = nullptr; } } reset;
  t_launch = &L, t_grid_dim = grid, t_block_dim = block;
  uint64_t linear = 0;  // linear block index; only its parity matters
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        L.greedy = schedule == Schedule::WarpGreedy || (schedule == Schedule::Alternate && (linear & 1));
        t_block = {x, y, z}, run_block(L, base, slot);
      }
}
}  // namespace detail

// Runs kernel<<<grid, block, shared_bytes>>>(args...) to completion; see the top of this file.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "st_emu::launch: wrong number of kernel arguments");
  using Tuple = std::tuple<std::decay_t<Params>...>;
  struct Payload { void (*kernel)(Params...); Tuple args; } p{kernel, Tuple(std::forward<Args>(args)...)};
  const auto body = [](void* v) { auto* q = static_cast<Payload*>(v); std::apply(q->kernel, q->args); };  // copies args
  detail::run(grid, block, shared_bytes, body, &p);
}
}  // namespace st_emu

// CUDA built-ins, read-only, at global scope.
#define threadIdx (static_cast<const ::uint3&>(::st_emu::detail::t_thread))
#define blockIdx (static_cast<const ::uint3&>(::st_emu::detail::t_block))
#define blockDim (static_cast<const ::dim3&>(::st_emu::detail::t_block_dim))
#define gridDim (static_cast<const ::dim3&>(::st_emu::detail::t_grid_dim))

inline void __syncthreads(const std::source_location& loc = std::source_location::current()) { st_emu::detail::sync_block(loc); }

// v of lane (lane ^ lane_mask) of the warp; all 32 lanes must call it with mask 0xffffffff.
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  if (lane_mask < 0 || lane_mask > 31 || width < 1 || width > 32 || (width & (width - 1)))
    throw std::runtime_error("st_emu: __shfl_xor_sync needs lane_mask in [0, 31] and width a power of 2 <= 32");
  return st_emu::detail::shuffle("__shfl_xor_sync", mask, v, [&](unsigned lane) {
    const unsigned src = lane ^ static_cast<unsigned>(lane_mask), w = static_cast<unsigned>(width);
    return src >= (lane / w + 1) * w ? lane : src;  // CUDA: a lane reading a later width-segment gets its own v
  });
}
