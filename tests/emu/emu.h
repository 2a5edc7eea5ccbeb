// Host emulator for the lrkernels CUDA kernels: runs the real kernel sources
// (include/lrkernels/*.cuh, after tests/emu/rewrite_launches.py has turned each
// `kernel<<<config>>>(args);` into `::emu::launch(...)`) on the CPU, compiled by the host
// compiler against the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h; no
// driver, no GPU, no libcudart).
//
// What it models:
//   * one OS thread per CUDA thread of a block; the blocks of a grid run one after another,
//     each with all of its threads live at once, so threadIdx/blockIdx/blockDim/gridDim are
//     per-thread values and every thread of a block really runs concurrently with the others;
//   * __shared__ variables as static storage, shared by the threads of the running block
//     (blocks do not overlap, so each block sees the storage the previous one left: a kernel
//     that reads shared memory before writing it gets stale data, not zeros);
//   * __syncthreads() as a barrier tagged with its call site: if the threads of a block
//     arrive at different __syncthreads() calls, or some reach one while others have left the
//     kernel, that is a divergent barrier (undefined behaviour on a GPU, often a hang) and the
//     emulator prints where and aborts;
//   * atomicAdd as a real atomic read-modify-write (std::atomic_ref);
//   * launch configurations: grid and block limits of sm_80+ are checked, a zero-sized grid
//     or block aborts, dynamic shared memory is refused (no kernel here uses it);
//   * WMMA (nvcuda::wmma, 16x16x16 fp16/bf16 -> fp32 only): every lane holds the whole 16x16
//     tile, mma_sync computes it in fp32, store_matrix_sync writes from lane 0 of the warp;
//     the documented rules are checked (pointers 32-byte aligned, ldm a multiple of 16 bytes)
//     and a violation aborts.
//
// What it does not model:
//   * warps and warp-level timing: no lockstep execution, no warp shuffles/votes, no check
//     that a warp's lanes call a WMMA operation together with the same arguments;
//   * the memory model beyond barriers: writes become visible to the block at __syncthreads()
//     (mutex + release/acquire), but weaker orderings a GPU allows between barriers, L1/L2
//     behaviour and __restrict__ aliasing assumptions are not reproduced; a race may or may
//     not show, depending on the OS scheduler;
//   * the real WMMA fragment layouts (which lane holds which element) and the tensor cores'
//     exact rounding; results agree with a GPU up to fp32 summation order;
//   * shared-memory and register capacity, occupancy, streams, concurrency between blocks,
//     and anything about performance.
//
// Include this header first, before any lrkernels header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// CUDA qualifiers mean nothing (or the wrong thing) to the host compiler.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __align__
#define __align__(n) __attribute__((aligned(n)))
#undef __shared__
#define __shared__ static

namespace emu {

// Where a thread waits: a __syncthreads() call site, or the end of the kernel.
struct SyncPoint {
  const char* file;
  int line;
  bool operator==(const SyncPoint& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};
inline constexpr SyncPoint kKernelEnd{"<end of kernel>", 0};

namespace detail {

// The block barrier. Arrivals are counted under a mutex (and checked to come from one call
// site); the last arrival bumps the generation, which the others wait on (futex).
class BlockBarrier {
 public:
  explicit BlockBarrier(unsigned threads) : threads_(threads) {}

  void arrive_and_wait(SyncPoint where, uint3 block, uint3 thread) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (arrived_ == 0) {
      first_ = where;
    } else if (!(where == first_)) {
      std::fprintf(stderr,
                   "EMU: divergent barrier in block (%u,%u,%u): thread (%u,%u,%u) is at %s:%d while "
                   "other threads of the block are at %s:%d\n",
                   block.x, block.y, block.z, thread.x, thread.y, thread.z, where.file, where.line, first_.file,
                   first_.line);
      std::abort();
    }
    if (++arrived_ == threads_) {
      arrived_ = 0;
      generation_.fetch_add(1, std::memory_order_release);
      generation_.notify_all();
      return;
    }
    const unsigned generation = generation_.load(std::memory_order_relaxed);
    lock.unlock();
    generation_.wait(generation, std::memory_order_acquire);
  }

 private:
  std::mutex mutex_;
  const unsigned threads_;
  unsigned arrived_ = 0;
  SyncPoint first_{};
  std::atomic<unsigned> generation_{0};
};

// The running thread's CUDA identity.
struct ThreadState {
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim, grid_dim;
  BlockBarrier* barrier = nullptr;
};
inline thread_local ThreadState current;
inline std::atomic<long> launches{0};
inline std::atomic<const void*> last_kernel{nullptr};
inline dim3 last_grid;  // written by launch() on the calling thread (tests launch from one thread)

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "EMU: %s\n", what);
  std::abort();
}

}  // namespace detail

inline void syncthreads(SyncPoint where) {
  detail::ThreadState& t = detail::current;
  if (t.barrier == nullptr) detail::fail("__syncthreads() outside a kernel");
  t.barrier->arrive_and_wait(where, t.block_idx, t.thread_idx);
}

// Lane of the running thread in its warp (x fastest, as on the GPU).
inline unsigned lane_id() {
  const detail::ThreadState& t = detail::current;
  const unsigned linear = t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z);
  return linear % 32;
}

// The <<<grid, block, shared_bytes, stream>>> part of a launch.
struct LaunchConfig {
  LaunchConfig(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t stream_ = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_bytes_), stream(stream_) {}
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

inline long launch_count() { return detail::launches.load(); }
// The kernel function of the latest launch (tests check which of two paths a launcher took).
inline const void* last_kernel() { return detail::last_kernel.load(); }
// The grid of the latest launch (tests check, e.g., that a launcher did not split K).
inline dim3 last_grid() { return detail::last_grid; }

// kernel<<<config>>>(args...): every block of the grid in turn, each with one OS thread per
// CUDA thread. Each thread receives its own copy of the arguments, as kernel parameters are.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& config, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  const dim3 grid = config.grid, block = config.block;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u || block.x > 1024u || block.y > 1024u ||
      block.z > 64u || block.x * block.y * block.z > 1024u) {
    std::fprintf(stderr, "EMU: invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)\n", grid.x, grid.y,
                 grid.z, block.x, block.y, block.z);
    std::abort();
  }
  if (config.shared_bytes != 0) detail::fail("dynamic shared memory is not emulated");
  detail::launches.fetch_add(1);
  detail::last_kernel.store(reinterpret_cast<const void*>(kernel));
  detail::last_grid = grid;
  const std::tuple<std::decay_t<Params>...> arguments(std::forward<Args>(args)...);
  const unsigned threads = block.x * block.y * block.z;
  detail::BlockBarrier barrier(threads);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (unsigned i = 0; i < threads; ++i) {
    workers.emplace_back([&, i] {
      detail::ThreadState& t = detail::current;
      t.thread_idx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      t.block_dim = block;
      t.grid_dim = grid;
      t.barrier = &barrier;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            t.block_idx = uint3{x, y, z};
            std::apply(kernel, arguments);                            // copies every argument
            barrier.arrive_and_wait(kKernelEnd, t.block_idx, t.thread_idx);  // all leave together
          }
      t.barrier = nullptr;
    });
  }
  for (std::thread& w : workers) w.join();
}

}  // namespace emu

#define threadIdx (::emu::detail::current.thread_idx)
#define blockIdx (::emu::detail::current.block_idx)
#define blockDim (::emu::detail::current.block_dim)
#define gridDim (::emu::detail::current.grid_dim)
#define __syncthreads() ::emu::syncthreads(::emu::SyncPoint{__FILE__, __LINE__})
// Launch errors abort inside emu::launch, so a launch that returns has succeeded.
#define cudaGetLastError() cudaSuccess

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// nvcuda::wmma, 16x16x16 tiles of fp16/bf16 with fp32 accumulators.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile, element (i, j) at v[i * 16 + j].
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 WMMA tiles only");
  float v[16 * 16];
};

namespace detail {
inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check_tile(const void* ptr, unsigned ldm, size_t element_bytes, const char* op) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    std::fprintf(stderr, "EMU: WMMA %s: pointer %p is not 32-byte aligned\n", op, ptr);
    std::abort();
  }
  if ((ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "EMU: WMMA %s: ldm %u (%zu-byte elements) is not a multiple of 16 bytes\n", op, ldm,
                 element_bytes);
    std::abort();
  }
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (float& e : f.v) e = value;
}

// Tile element (i, j) is ptr[i * ldm + j] (row_major) or ptr[i + j * ldm] (col_major).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a/matrix_b fragments carry their layout");
  detail::check_tile(ptr, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool rows = std::is_same_v<Layout, row_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i * 16 + j] = detail::to_float(rows ? ptr[i * ldm + j] : ptr[i + j * ldm]);
}

// d = a b + c (d may alias c).
template <typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<TA, TB>, "A and B of one MMA have the same element type");
  float result[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum += a.v[i * 16 + k] * b.v[k * 16 + j];
      result[i * 16 + j] = sum;
    }
  for (int e = 0; e < 16 * 16; ++e) d.v[e] = result[e];
}

// Every lane holds the same tile, so lane 0 of the warp writes it.
inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_tile(ptr, ldm, sizeof(float), "store_matrix_sync");
  if (emu::lane_id() != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.v[i * 16 + j];
}

}  // namespace wmma
}  // namespace nvcuda
