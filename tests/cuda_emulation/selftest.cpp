// Build + run: g++ -std=c++20 -O2 -Wall -Wextra -o /tmp/emu_selftest tests/cuda_emulation/selftest.cpp && /tmp/emu_selftest
// Self-test of the CUDA emulation runtime (no torch, no GPU). No `#pragma unroll` here: g++ warns about it (see
// runtime.h). Uses CHECK rather than assert, so it also checks under NDEBUG.
#include "runtime.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

namespace {

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

// totals[r * blockDim.x + t] = sum of in[r, :] as seen by thread t (grid-stride over rows).
__global__ void __launch_bounds__(256) row_sum_kernel(const float* __restrict__ in, float* __restrict__ totals,
                                                      int rows, int cols) {
  __shared__ float scratch[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += in[static_cast<int64_t>(r) * cols + c];
    totals[r * blockDim.x + threadIdx.x] = block_sum(s, scratch);
  }
}

__global__ void index_kernel(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 9 * (block * blockDim.x * blockDim.y * blockDim.z + tid);
  const unsigned v[9] = {blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, threadIdx.x, threadIdx.y, threadIdx.z, blockDim.x};
  for (int i = 0; i < 9; ++i) o[i] = v[i];
}

__global__ void int_shuffle_kernel(int* out) {  // int overload and lane mapping
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, 5);
}

__global__ void divergent_barrier_kernel(int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  __syncthreads();
}

__global__ void early_return_kernel() {  // thread 0 runs first and returns; thread 1 then reaches the barrier
  if (threadIdx.x == 0) return;
  __syncthreads();
}

__global__ void partial_warp_kernel(float* out) {  // blockDim 48: warp 1 has lanes 32..47 only
  out[threadIdx.x] = warp_sum(1.f);
}

__global__ void partial_mask_kernel() { __shfl_xor_sync(0x0000ffffu, 1.f, 1); }

__global__ void deadlock_kernel() {  // half the warp shuffles, the other half waits at the block barrier
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0xffffffffu, 1.f, 1);
  else __syncthreads();
}

__global__ void exit_in_shuffle_kernel() {
  if (threadIdx.x == 7) return;
  (void)warp_sum(1.f);
}

__global__ void different_barriers_kernel() {
  if (threadIdx.x & 1) __syncthreads();
  else __syncthreads();
}

// block_sum without barrier (A): a warp that runs ahead into the next call overwrites scratch[warp] before a
// slower warp has read it. out[(block * 3 + call) * 256 + t]; call i sums t * (i + 1) + i over the block.
template <bool kBarrierA>
__global__ void repeated_block_sum_kernel(float* out) {
  __shared__ float scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int i = 0; i < 3; ++i) {
    float v = warp_sum(static_cast<float>(threadIdx.x * (i + 1) + i));
    if (kBarrierA) __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    out[(blockIdx.x * 3 + i) * blockDim.x + threadIdx.x] = warp_sum(lane < warps ? scratch[lane] : 0.f);
  }
}

// Runs repeated_block_sum_kernel<kBarrierA> on 2 blocks x 256 threads under ST_EMU_SCHEDULE=schedule (nullptr:
// unset); returns, per block, whether all its results are exact.
template <bool kBarrierA>
std::vector<bool> repeated_block_sum_exact(const char* schedule) {
  if (schedule) setenv("ST_EMU_SCHEDULE", schedule, 1);
  else unsetenv("ST_EMU_SCHEDULE");
  std::vector<float> out(2 * 3 * 256, -1.f);
  st_emu::launch(repeated_block_sum_kernel<kBarrierA>, 2, 256, 0, out.data());
  std::vector<bool> exact(2, true);
  for (int b = 0; b < 2; ++b)
    for (int i = 0; i < 3; ++i)
      for (int t = 0; t < 256; ++t)
        exact[b] = exact[b] && out[(b * 3 + i) * 256 + t] == static_cast<float>(32640 * (i + 1) + 256 * i);
  return exact;
}

struct Tracker {
  int* live;
  explicit Tracker(int* l) : live(l) { ++*live; }
  ~Tracker() { --*live; }
};
__global__ void throwing_kernel(int* live) {
  Tracker t(live);
  __syncthreads();
  if (threadIdx.x == 37 && blockIdx.x == 1) throw std::logic_error("kernel failure 37");
  __syncthreads();
}

__global__ void two_barriers_kernel(int* counts) {
  __shared__ int n;
  if (threadIdx.x == 0) n = 0;
  __syncthreads();
  ++n;  // no atomics needed: fibers never interleave between barriers
  __syncthreads();
  if (threadIdx.x == 0) counts[blockIdx.x] = n;
}

std::string launch_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}
bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

}  // namespace

int main() {
  {  // block reduction: exact integer sums, grid-stride over more rows than blocks
    const int rows = 37, cols = 1000;
    std::vector<float> in(rows * cols), totals(rows * 256, -1.f);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) in[r * cols + c] = static_cast<float>((r * 7 + c * 3) % 11);
    st_emu::launch(row_sum_kernel, dim3(5), dim3(256), 0, in.data(), totals.data(), rows, cols);
    for (int r = 0; r < rows; ++r) {
      long expect = 0;
      for (int c = 0; c < cols; ++c) expect += (r * 7 + c * 3) % 11;
      for (int t = 0; t < 256; ++t) CHECK(totals[r * 256 + t] == static_cast<float>(expect));
    }
    std::printf("block_sum: %d rows OK\n", rows);
  }
  {  // built-in indices in a 2-D grid of 2-D blocks
    const dim3 grid(3, 2), block(32, 2);
    const unsigned threads = 64, blocks = 6;
    std::vector<unsigned> out(9 * threads * blocks, 12345u);
    st_emu::launch(index_kernel, grid, block, 0, out.data());
    for (unsigned by = 0; by < 2; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned ty = 0; ty < 2; ++ty)
          for (unsigned tx = 0; tx < 32; ++tx) {
            const unsigned* o = &out[9 * ((bx + 3 * by) * threads + tx + 32 * ty)];
            const unsigned expect[9] = {bx, by, 0, 3, 2, tx, ty, 0, 32};
            for (int i = 0; i < 9; ++i) CHECK(o[i] == expect[i]);
          }
    std::vector<int> sh(64);
    st_emu::launch(int_shuffle_kernel, 1, 64, 0, sh.data());
    for (int t = 0; t < 64; ++t) CHECK(sh[t] == (t ^ 5) * 10);
    std::printf("indices + int shuffle OK\n");
  }
  {  // strictness: each of these must throw from launch with a specific message
    std::vector<float> buf(64);
    std::string e = launch_error([] { st_emu::launch(divergent_barrier_kernel, 2, 64, 0, 40); });
    std::printf("divergent barrier -> %s\n", e.c_str());
    CHECK(contains(e, "block (0,0,0)") && contains(e, "divergent barrier"));
    e = launch_error([] { st_emu::launch(early_return_kernel, dim3(2, 2), 64, 0); });
    std::printf("barrier after ret -> %s\n", e.c_str());
    CHECK(contains(e, "block (0,0,0) thread (1,0,0): __syncthreads() reached after 1 thread(s)"));
    e = launch_error([] { st_emu::launch(divergent_barrier_kernel, 1, 64, 0, 0); });  // all return: no error
    CHECK(e.empty());
    e = launch_error([&] { st_emu::launch(partial_warp_kernel, 1, 48, 0, buf.data()); });
    std::printf("partial warp      -> %s\n", e.c_str());
    CHECK(contains(e, "partial warp 1") && contains(e, "thread (32,0,0)"));
    e = launch_error([] { st_emu::launch(partial_mask_kernel, 1, 32, 0); });
    std::printf("partial mask      -> %s\n", e.c_str());
    CHECK(contains(e, "mask 0x0000ffff"));
    e = launch_error([] { st_emu::launch(deadlock_kernel, 1, 32, 0); });
    std::printf("deadlock          -> %s\n", e.c_str());
    CHECK(contains(e, "deadlock in block (0,0,0)"));
    e = launch_error([] { st_emu::launch(exit_in_shuffle_kernel, 1, 64, 0); });
    std::printf("exit in shuffle   -> %s\n", e.c_str());
    CHECK(contains(e, "thread (7,0,0): returned while 7 lane(s)"));
    e = launch_error([] { st_emu::launch(different_barriers_kernel, 1, 64, 0); });
    std::printf("two barrier sites -> %s\n", e.c_str());
    CHECK(contains(e, "divergent barrier"));
    int live = 0;
    e = launch_error([&] { st_emu::launch(throwing_kernel, 3, 64, 0, &live); });
    std::printf("kernel exception  -> %s (live locals after: %d)\n", e.c_str(), live);
    CHECK(e == "kernel failure 37" && live == 0);
    CHECK(contains(launch_error([] { st_emu::launch(partial_mask_kernel, 1, 1025, 0); }), "block dimensions"));
    CHECK(contains(launch_error([] { st_emu::launch(partial_mask_kernel, dim3(1, 0), 32, 0); }), "grid dimensions"));
    CHECK(contains(launch_error([] { st_emu::launch(partial_mask_kernel, 1, 32, 16); }), "shared memory"));
    CHECK(contains(launch_error([] { __syncthreads(); }), "outside st_emu::launch"));
    // the runtime is still usable after aborted launches
    std::vector<int> sh(32);
    st_emu::launch(int_shuffle_kernel, 1, 32, 0, sh.data());
    CHECK(sh[0] == 50);
    std::printf("strictness OK\n");
  }
  {  // schedules: warp-greedy exposes the missing barrier (A); the correct kernel is exact under every schedule
    const char* outer = std::getenv("ST_EMU_SCHEDULE");
    const std::string saved = outer ? outer : "";
    for (const char* sched : {static_cast<const char*>(nullptr), "round-robin", "warp-greedy", "alternate"}) {
      const std::vector<bool> good = repeated_block_sum_exact<true>(sched), racy = repeated_block_sum_exact<false>(sched);
      std::printf("schedule %-11s: with barrier (A) exact = %d %d, without = %d %d\n", sched ? sched : "(unset)",
                  int(good[0]), int(good[1]), int(racy[0]), int(racy[1]));
      CHECK(good[0] && good[1]);
      const bool greedy0 = sched && !std::strcmp(sched, "warp-greedy"), greedy1 = !sched || std::strcmp(sched, "round-robin");
      CHECK(racy[0] != greedy0 && racy[1] != greedy1);  // wrong exactly in the warp-greedy blocks
    }
    setenv("ST_EMU_SCHEDULE", "bogus", 1);
    const std::string e = launch_error([] { st_emu::launch(partial_mask_kernel, 1, 32, 0); });
    std::printf("bad schedule      -> %s\n", e.c_str());
    CHECK(contains(e, "ST_EMU_SCHEDULE=bogus"));
    if (outer) setenv("ST_EMU_SCHEDULE", saved.c_str(), 1);
    else unsetenv("ST_EMU_SCHEDULE");
    std::printf("schedules OK\n");
  }
  {  // throughput: 2048 blocks x 256 threads, 2 barriers each
    const unsigned blocks = 2048;
    std::vector<int> counts(blocks, 0);
    const auto t0 = std::chrono::steady_clock::now();
    st_emu::launch(two_barriers_kernel, blocks, 256, 0, counts.data());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int c : counts) CHECK(c == 256);
    std::printf("timing: 2048 blocks x 256 threads x 2 barriers: %.3f s\n", s);
  }
  std::printf("ALL OK\n");
  return 0;
}
