// Just enough of CUDA for the host compiler to run the kernels of csrc/cuda/*.cuh as written, on CPU threads.
//
// Include this before the kernel headers. Semantics kept:
// * one CPU thread per CUDA thread of a block, all alive at once; blockIdx/threadIdx/blockDim/gridDim are
//   thread-local;
// * __syncthreads() is a real barrier: a thread that reaches it waits for every other live thread of its block, and a
//   thread that returns stops counting (as on the GPU, where exited threads no longer hold a barrier up);
// * dynamic shared memory (`extern __shared__ ... shared_bytes[]`) is one buffer that each block finds filled with NaN
//   (all-ones bytes, a NaN in float32 and float64) and the bytes past the launch's size filled with a guard pattern
//   that must still be there when the block ends: a kernel that reads memory nobody wrote, or reads or writes past
//   what the launch asked for, gives NaN or a failed launch;
// * blocks run one after the other (the kernels never let blocks talk to each other), threads of a block at once, so
//   ThreadSanitizer sees every pair of accesses that the barriers do not order;
// * a launch over the device's per-block limits (threads, the kernel's __launch_bounds__, shared memory) fails, as
//   cudaLaunchKernel would.
// No warp-level intrinsics are emulated: the kernels use none.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cinc {
namespace cuda {
// The buffer behind every kernel's `extern __shared__ ... shared_bytes[]` (a block-scope extern declaration names
// this namespace-scope array). Larger than any GPU's per-block shared memory.
constexpr size_t kEmulatedSharedCapacity = 512 * 1024;
alignas(128) inline unsigned char shared_bytes[kEmulatedSharedCapacity];
}  // namespace cuda
}  // namespace cinc

namespace cuda_emulation {

constexpr unsigned char kUnwritten = 0xFF;
constexpr size_t kGuardBytes = 64 * 1024;

// A barrier that really blocks, built on a mutex and a condition variable (which ThreadSanitizer models exactly).
class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : live_(threads) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == live_) {
      release();
      return;
    }
    // A barrier that is never completed (divergent __syncthreads()) would hang; fail loudly instead.
    if (!released_.wait_for(lock, std::chrono::seconds(120), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "emulation: __syncthreads() not reached by every thread of the block within 120 s\n");
      std::abort();
    }
  }

  void drop() {  // a thread returned from the kernel
    std::unique_lock<std::mutex> lock(mutex_);
    --live_;
    if (arrived_ > 0 && arrived_ == live_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    released_.notify_all();
  }
  std::mutex mutex_;
  std::condition_variable released_;
  int live_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

inline thread_local BlockBarrier* current_barrier = nullptr;

// What a launch may use: the GPU's per-block limits.
struct Device {
  size_t shared_bytes_per_block = 232448;  // H200 (sm_90) opt-in maximum
  unsigned int threads_per_block = 1024;
};

struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per launch, for the tests: how many blocks ran and the largest block.
struct LaunchRecord {
  uint64_t blocks = 0;
  unsigned int threads_per_block = 0;
  size_t shared_bytes = 0;
};

inline LaunchRecord& last_launch() {
  static LaunchRecord record;
  return record;
}

// kernel<<<grid, block, shared_bytes>>>(args...) for a kernel declared __launch_bounds__(max_threads).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, int max_threads,
            const Device& device, Args&&... args) {
  const unsigned int threads = block.x * block.y * block.z;
  if (threads == 0 || threads > device.threads_per_block || threads > static_cast<unsigned int>(max_threads)) {
    throw LaunchError("launch: " + std::to_string(threads) + " threads per block, the limit is " +
                      std::to_string(std::min<unsigned int>(device.threads_per_block, max_threads)));
  }
  if (shared_bytes > device.shared_bytes_per_block || shared_bytes > cinc::cuda::kEmulatedSharedCapacity) {
    throw LaunchError("launch: " + std::to_string(shared_bytes) + " bytes of shared memory per block, the limit is " +
                      std::to_string(device.shared_bytes_per_block));
  }
  const std::tuple<std::decay_t<Params>...> arguments(std::forward<Args>(args)...);
  LaunchRecord& record = last_launch();
  record = LaunchRecord{0, threads, shared_bytes};
  unsigned char* shared = cinc::cuda::shared_bytes;
  // Stray writes land just past the end of what the launch asked for: guard that much.
  const size_t guarded_end = std::min(cinc::cuda::kEmulatedSharedCapacity, shared_bytes + kGuardBytes);
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        std::memset(shared, kUnwritten, guarded_end);
        BlockBarrier barrier(static_cast<int>(threads));
        struct Thread {
          pthread_t handle;
          uint3 index;
        };
        std::vector<Thread> team(threads);
        struct Start {
          const decltype(arguments)* kernel_arguments;
          void (*kernel)(Params...);
          BlockBarrier* barrier;
          uint3 block_index, thread_index;
          dim3 grid, block;
        };
        std::vector<Start> starts(threads);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        for (unsigned int t = 0; t < threads; ++t) {
          const uint3 index{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          starts[t] = Start{&arguments, kernel, &barrier, uint3{bx, by, bz}, index, grid, block};
          const auto body = [](void* raw) -> void* {
            const Start& s = *static_cast<Start*>(raw);
            threadIdx = s.thread_index;
            blockIdx = s.block_index;
            blockDim = s.block;
            gridDim = s.grid;
            current_barrier = s.barrier;
            std::apply(s.kernel, *s.kernel_arguments);
            s.barrier->drop();
            return nullptr;
          };
          if (pthread_create(&team[t].handle, &attr, body, &starts[t]) != 0) {
            std::fprintf(stderr, "emulation: could not start thread %u of a block\n", t);
            std::abort();
          }
        }
        pthread_attr_destroy(&attr);
        for (auto& t : team) pthread_join(t.handle, nullptr);
        for (size_t e = shared_bytes; e < guarded_end; ++e) {
          if (shared[e] != kUnwritten) {
            throw LaunchError("launch: the kernel wrote shared memory byte " + std::to_string(e) +
                              ", past the " + std::to_string(shared_bytes) + " bytes the launch asked for");
          }
        }
        ++record.blocks;
      }
    }
  }
}

}  // namespace cuda_emulation

inline void __syncthreads() {
  if (cuda_emulation::current_barrier == nullptr) {
    std::fprintf(stderr, "emulation: __syncthreads() outside a kernel launch\n");
    std::abort();
  }
  cuda_emulation::current_barrier->arrive_and_wait();
}
