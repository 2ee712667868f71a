// Just enough of CUDA for the host compiler to run the kernels of csrc/cuda/*.cuh as written, on CPU threads.
//
// Include this before the kernel headers. Semantics kept:
// * one CPU thread per CUDA thread of a block (of every block of a thread-block cluster), all alive at once;
//   blockIdx/threadIdx/blockDim/gridDim are thread-local;
// * __syncthreads() is a real barrier: a thread that reaches it waits for every other live thread of its block, and a
//   thread that returns stops counting (as on the GPU, where exited threads no longer hold a barrier up);
//   cluster_barrier() is the same across all blocks of a cluster;
// * dynamic shared memory (`extern __shared__ ... shared_bytes[]`, or block_shared_memory() of csrc/cuda/cinc_device.h)
//   is one buffer per block that the block finds filled with NaN (all-ones bytes, a NaN in float32 and float64) and
//   the bytes past the launch's size filled with a guard pattern that must still be there when the block ends: a
//   kernel that reads memory nobody wrote, or reads or writes past what the launch asked for, gives NaN or a failed
//   launch; cluster_peer() maps an address to the same offset in another block's buffer (distributed shared memory);
// * blocks of a cluster run at once, clusters one after the other (plain launches: clusters of one block), so
//   ThreadSanitizer sees every pair of accesses that the barriers do not order, within a block and across a cluster;
// * a launch over the device's limits (threads, the kernel's __launch_bounds__, shared memory, cluster size) fails,
//   as cudaLaunchKernel would; a vector access through ld()/st() that its alignment does not divide aborts, as the
//   GPU would fault.
//
// Counting (when set_counting(true)): every load and store that the kernels route through ld()/st() and that lands in
// shared memory is recorded per thread and per phase (the accesses between two barriers). When a phase ends, the
// accesses of each warp (32 consecutive threads) are grouped by site (source line) and occurrence — the n-th access
// at a site of every lane that made one is one warp-wide access, which is how a converged warp issues them — and each
// warp-wide access costs as many shared-memory wavefronts as the most distinct 4-byte words any one of the 32 banks
// must deliver (a word that several lanes read is delivered once: a broadcast). Its conflict degree is that over the
// fewest wavefronts its distinct words could take (⌈words / 32⌉). Per phase and site also: how many accesses each
// thread made, hence the threads active and the balance between them.
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
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <source_location>
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
// The buffer behind a kernel's `extern __shared__ ... shared_bytes[]` (a block-scope extern declaration names this
// namespace-scope array): the shared memory of plain launches, whose blocks run one after the other. Larger than any
// GPU's per-block shared memory.
constexpr size_t kEmulatedSharedCapacity = 512 * 1024;
alignas(128) inline unsigned char shared_bytes[kEmulatedSharedCapacity];
}  // namespace cuda
}  // namespace cinc

namespace cuda_emulation {

constexpr unsigned char kUnwritten = 0xFF;
constexpr size_t kGuardBytes = 64 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size
constexpr int kWarp = 32;
constexpr int kBanks = 32;

// The other blocks of a cluster (the first is the plain launches' buffer).
alignas(128) inline unsigned char cluster_shared[kMaxCluster - 1][cinc::cuda::kEmulatedSharedCapacity];

inline unsigned char* shared_buffer(int rank) {
  return rank == 0 ? cinc::cuda::shared_bytes : cluster_shared[rank - 1];
}

// ---------------------------------------------------------------------------------------------------------------
// Counting

struct Access {
  const char* file;
  uint32_t line;
  uint32_t bytes;
  uintptr_t address;
  bool store;
};

struct SiteKey {
  std::string file;
  uint32_t line;
  bool store;
  bool operator<(const SiteKey& o) const { return std::tie(file, line, store) < std::tie(o.file, o.line, o.store); }
};

struct SiteCount {  // per phase
  uint64_t accesses = 0;       // lane accesses
  uint64_t max_per_thread = 0;
  uint64_t active_threads = 0;
  uint64_t warp_accesses = 0;
  uint64_t wavefronts = 0;
  uint64_t ideal = 0;
  double worst = 0;            // largest wavefronts / ideal of one warp-wide access
  uint64_t bytes = 0;          // largest access width seen
  bool remote = false;         // into another block's shared memory
};

struct Phase {
  int block;
  std::string end;  // file:line of the barrier that ended it, or "exit"
  unsigned threads;
  std::map<SiteKey, SiteCount> sites;
};

struct Counters {
  bool enabled = false;
  std::mutex mutex;  // the blocks of a cluster end their phases at once
  std::vector<Phase> phases;
};

inline Counters& counters() {
  static Counters c;
  return c;
}

inline void set_counting(bool on) {
  counters().enabled = on;
  counters().phases.clear();
}

// Wavefronts of one warp-wide access: the most distinct words any bank delivers; and the fewest possible.
inline std::pair<uint64_t, uint64_t> wavefronts_of(const std::vector<const Access*>& lanes) {
  std::set<uintptr_t> words;
  for (const Access* a : lanes) {
    for (uint32_t b = 0; b < std::max<uint32_t>(a->bytes, 4); b += 4) words.insert((a->address + b) / 4);
  }
  uint64_t per_bank[kBanks] = {};
  for (const uintptr_t w : words) ++per_bank[w % kBanks];
  const uint64_t most = *std::max_element(per_bank, per_bank + kBanks);
  return {most, (words.size() + kBanks - 1) / kBanks};
}

// State of one emulated thread.
struct ThreadState {
  int block;            // rank in the cluster
  unsigned linear;      // index in the block
  unsigned char* own;   // its block's shared memory
  unsigned char* const* cluster;  // every block's shared memory, `blocks` of them
  int blocks;
  size_t shared_size;   // what the launch asked for (bytes)
  std::vector<Access> trace;
};

inline thread_local ThreadState* current_thread = nullptr;

inline bool in_shared(const ThreadState& t, uintptr_t address, bool* remote) {
  for (int r = 0; r < t.blocks; ++r) {
    const auto base = reinterpret_cast<uintptr_t>(t.cluster[r]);
    if (address >= base && address < base + cinc::cuda::kEmulatedSharedCapacity) {
      *remote = r != t.block;
      return true;
    }
  }
  return false;
}

inline void record(const void* p, size_t bytes, bool store, const std::source_location& where) {
  ThreadState* t = current_thread;
  if (t == nullptr || !counters().enabled) return;
  bool remote = false;
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (!in_shared(*t, address, &remote)) return;
  t->trace.push_back(Access{where.file_name(), where.line(), static_cast<uint32_t>(bytes), address, store});
}

// A vector access at an address its alignment does not divide faults on the GPU ("misaligned address").
inline void check_alignment(const void* p, size_t alignment, const std::source_location& at) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0) {
    std::fprintf(stderr, "emulation: misaligned %zu-byte access at %s:%u\n", alignment, at.file_name(),
                 static_cast<unsigned>(at.line()));
    std::abort();
  }
}

inline std::string short_file(const char* path) {
  const std::string s(path);
  const size_t slash = s.find_last_of('/');
  return slash == std::string::npos ? s : s.substr(slash + 1);
}

// Ends a phase for the threads of one block (called with every one of them waiting at a barrier, or gone).
inline void end_phase(std::vector<ThreadState*>& threads, int block, const std::string& end) {
  Counters& c = counters();
  if (!c.enabled) return;
  Phase phase{block, end, static_cast<unsigned>(threads.size()), {}};
  bool any = false;
  for (size_t w0 = 0; w0 < threads.size(); w0 += kWarp) {
    const size_t w1 = std::min(threads.size(), w0 + kWarp);
    // lane → site → its accesses at that site, in order
    std::map<SiteKey, std::vector<std::vector<const Access*>>> by_site;
    for (size_t l = w0; l < w1; ++l) {
      for (const Access& a : threads[l]->trace) {
        auto& lanes = by_site[SiteKey{short_file(a.file), a.line, a.store}];
        lanes.resize(kWarp);
        lanes[l - w0].push_back(&a);
      }
    }
    for (auto& [key, lanes] : by_site) {
      SiteCount& s = phase.sites[key];
      size_t longest = 0;
      for (const auto& lane : lanes) {
        longest = std::max(longest, lane.size());
        s.accesses += lane.size();
        s.max_per_thread = std::max<uint64_t>(s.max_per_thread, lane.size());
        s.active_threads += lane.empty() ? 0 : 1;
      }
      for (size_t n = 0; n < longest; ++n) {
        std::vector<const Access*> warp;
        for (const auto& lane : lanes) {
          if (n < lane.size()) warp.push_back(lane[n]);
        }
        const auto [wavefronts, ideal] = wavefronts_of(warp);
        s.warp_accesses += 1;
        s.wavefronts += wavefronts;
        s.ideal += ideal;
        s.worst = std::max(s.worst, static_cast<double>(wavefronts) / static_cast<double>(ideal));
        for (const Access* a : warp) {
          s.bytes = std::max<uint64_t>(s.bytes, a->bytes);
          bool remote = false;
          in_shared(*threads[w0], a->address, &remote);
          s.remote = s.remote || remote;
        }
      }
      any = true;
    }
  }
  for (ThreadState* t : threads) t->trace.clear();
  if (any) {
    const std::lock_guard<std::mutex> lock(c.mutex);
    c.phases.push_back(std::move(phase));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Barriers

// A barrier that really blocks, built on a mutex and a condition variable (which ThreadSanitizer models exactly).
// The thread that completes it runs `on_release` first, while every other thread waits.
class Barrier {
 public:
  Barrier(int threads, std::string what) : live_(threads), what_(std::move(what)) {}

  template <typename OnRelease>
  void arrive_and_wait(OnRelease&& on_release) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == live_) {
      on_release();
      release();
      return;
    }
    // A barrier that is never completed (divergent __syncthreads()) would hang; fail loudly instead.
    if (!released_.wait_for(lock, std::chrono::seconds(300), [&] { return generation_ != generation; })) {
      std::fprintf(stderr, "emulation: %s not reached by every thread within 300 s\n", what_.c_str());
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
  std::string what_;
};

struct BlockContext {
  Barrier* block_barrier;
  Barrier* cluster_barrier;
  std::vector<std::vector<ThreadState*>>* cluster_threads;  // per block
  int block;
};

inline thread_local BlockContext* current_block = nullptr;

inline std::string where(const std::source_location& at) { return short_file(at.file_name()) + ":" +
                                                                  std::to_string(at.line()); }

// ---------------------------------------------------------------------------------------------------------------
// Launches

// What a launch may use: the GPU's limits.
struct Device {
  size_t shared_bytes_per_block = 232448;  // H100 / H200 (sm_90) opt-in maximum
  unsigned int threads_per_block = 1024;
  int max_cluster = kMaxCluster;
};

struct LaunchError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per launch, for the tests: how many blocks ran and the largest block.
struct LaunchRecord {
  uint64_t blocks = 0;
  unsigned int threads_per_block = 0;
  size_t shared_bytes = 0;
  unsigned int cluster = 1;
};

inline LaunchRecord& last_launch() {
  static LaunchRecord record;
  return record;
}

// kernel<<<grid, block, shared_bytes>>>(args...) in clusters of `cluster` blocks along x (cudaLaunchKernelEx with a
// cluster dimension), for a kernel declared __launch_bounds__(max_threads).
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned int cluster, size_t shared_bytes,
                    int max_threads, const Device& device, Args&&... args) {
  const unsigned int threads = block.x * block.y * block.z;
  if (threads == 0 || threads > device.threads_per_block || threads > static_cast<unsigned int>(max_threads)) {
    throw LaunchError("launch: " + std::to_string(threads) + " threads per block, the limit is " +
                      std::to_string(std::min<unsigned int>(device.threads_per_block, max_threads)));
  }
  if (shared_bytes > device.shared_bytes_per_block || shared_bytes > cinc::cuda::kEmulatedSharedCapacity) {
    throw LaunchError("launch: " + std::to_string(shared_bytes) + " bytes of shared memory per block, the limit is " +
                      std::to_string(device.shared_bytes_per_block));
  }
  if (cluster == 0 || static_cast<int>(cluster) > std::min(device.max_cluster, kMaxCluster) || grid.x % cluster != 0) {
    throw LaunchError("launch: clusters of " + std::to_string(cluster) + " blocks (grid " + std::to_string(grid.x) +
                      ", at most " + std::to_string(device.max_cluster) + " per cluster on this device)");
  }
  const std::tuple<std::decay_t<Params>...> arguments(std::forward<Args>(args)...);
  LaunchRecord& record = last_launch();
  record = LaunchRecord{0, threads, shared_bytes, cluster};
  // Stray writes land just past the end of what the launch asked for: guard that much.
  const size_t guarded_end = std::min(cinc::cuda::kEmulatedSharedCapacity, shared_bytes + kGuardBytes);
  unsigned char* buffers[kMaxCluster];
  for (unsigned int r = 0; r < cluster; ++r) buffers[r] = shared_buffer(static_cast<int>(r));
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx0 = 0; bx0 < grid.x; bx0 += cluster) {
        for (unsigned int r = 0; r < cluster; ++r) std::memset(buffers[r], kUnwritten, guarded_end);
        Barrier cluster_barrier(static_cast<int>(threads * cluster), "cluster_barrier()");
        std::vector<std::unique_ptr<Barrier>> block_barriers;
        for (unsigned int r = 0; r < cluster; ++r) {
          block_barriers.push_back(std::make_unique<Barrier>(static_cast<int>(threads), "__syncthreads()"));
        }
        std::vector<std::vector<ThreadState*>> cluster_threads(cluster);
        std::vector<BlockContext> contexts(cluster);
        std::vector<ThreadState> states(static_cast<size_t>(threads) * cluster);
        for (unsigned int r = 0; r < cluster; ++r) {
          contexts[r] = BlockContext{block_barriers[r].get(), &cluster_barrier, &cluster_threads, static_cast<int>(r)};
          for (unsigned int t = 0; t < threads; ++t) {
            ThreadState& s = states[r * threads + t];
            s = ThreadState{static_cast<int>(r), t, buffers[r], buffers, static_cast<int>(cluster), shared_bytes, {}};
            cluster_threads[r].push_back(&s);
          }
        }
        struct Start {
          const decltype(arguments)* kernel_arguments;
          void (*kernel)(Params...);
          BlockContext* context;
          ThreadState* state;
          uint3 block_index, thread_index;
          dim3 grid, block;
        };
        std::vector<Start> starts(static_cast<size_t>(threads) * cluster);
        std::vector<pthread_t> team(starts.size());
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        for (unsigned int r = 0; r < cluster; ++r) {
          for (unsigned int t = 0; t < threads; ++t) {
            const uint3 index{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            const size_t n = r * threads + t;
            starts[n] = Start{&arguments, kernel, &contexts[r], &states[n], uint3{bx0 + r, by, bz}, index, grid, block};
            const auto body = [](void* raw) -> void* {
              const Start& s = *static_cast<Start*>(raw);
              threadIdx = s.thread_index;
              blockIdx = s.block_index;
              blockDim = s.block;
              gridDim = s.grid;
              current_block = s.context;
              current_thread = s.state;
              std::apply(s.kernel, *s.kernel_arguments);
              s.context->block_barrier->drop();
              s.context->cluster_barrier->drop();
              return nullptr;
            };
            if (pthread_create(&team[n], &attr, body, &starts[n]) != 0) {
              std::fprintf(stderr, "emulation: could not start thread %u of a block\n", t);
              std::abort();
            }
          }
        }
        pthread_attr_destroy(&attr);
        for (auto& t : team) pthread_join(t, nullptr);
        for (unsigned int r = 0; r < cluster; ++r) end_phase(cluster_threads[r], static_cast<int>(r), "exit");
        for (unsigned int r = 0; r < cluster; ++r) {
          for (size_t e = shared_bytes; e < guarded_end; ++e) {
            if (buffers[r][e] != kUnwritten) {
              throw LaunchError("launch: the kernel wrote shared memory byte " + std::to_string(e) + ", past the " +
                                std::to_string(shared_bytes) + " bytes the launch asked for");
            }
          }
        }
        record.blocks += cluster;
      }
    }
  }
}

// kernel<<<grid, block, shared_bytes>>>(args...): clusters of one block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, int max_threads,
            const Device& device, Args&&... args) {
  launch_cluster(kernel, grid, block, 1, shared_bytes, max_threads, device, std::forward<Args>(args)...);
}

}  // namespace cuda_emulation

inline void __syncthreads(const std::source_location at = std::source_location::current()) {
  cuda_emulation::BlockContext* b = cuda_emulation::current_block;
  if (b == nullptr) {
    std::fprintf(stderr, "emulation: __syncthreads() outside a kernel launch\n");
    std::abort();
  }
  b->block_barrier->arrive_and_wait([&] {
    cuda_emulation::end_phase((*b->cluster_threads)[b->block], b->block, cuda_emulation::where(at));
  });
}

// The device primitives of csrc/cuda/cinc_device.h.
namespace cinc {
namespace cuda {

template <typename V>
inline V ld(const V* p, const std::source_location at = std::source_location::current()) {
  cuda_emulation::check_alignment(p, alignof(V), at);
  cuda_emulation::record(p, sizeof(V), false, at);
  return *p;
}

template <typename V>
inline void st(V* p, const V& v, const std::source_location at = std::source_location::current()) {
  cuda_emulation::check_alignment(p, alignof(V), at);
  cuda_emulation::record(p, sizeof(V), true, at);
  *p = v;
}

inline unsigned char* block_shared_memory() { return cuda_emulation::current_thread->own; }

inline void cluster_barrier(const std::source_location at = std::source_location::current()) {
  cuda_emulation::BlockContext* b = cuda_emulation::current_block;
  if (b == nullptr) {
    std::fprintf(stderr, "emulation: cluster_barrier() outside a kernel launch\n");
    std::abort();
  }
  b->cluster_barrier->arrive_and_wait([&] {
    auto& blocks = *b->cluster_threads;
    for (size_t r = 0; r < blocks.size(); ++r) {
      cuda_emulation::end_phase(blocks[r], static_cast<int>(r), cuda_emulation::where(at));
    }
  });
}

// Kernels run one after the other here: nothing to allow or wait for.
inline void allow_dependent_launch() {}
inline void wait_for_prerequisites() {}

template <typename V>
inline V* cluster_peer(V* p, unsigned int rank) {
  const cuda_emulation::ThreadState* t = cuda_emulation::current_thread;
  if (static_cast<int>(rank) >= t->blocks) {
    std::fprintf(stderr, "emulation: cluster_peer() to block %u of a cluster of %d\n", rank, t->blocks);
    std::abort();
  }
  const auto offset = reinterpret_cast<unsigned char*>(p) - t->own;
  if (offset < 0 || static_cast<size_t>(offset) >= t->shared_size) {
    std::fprintf(stderr, "emulation: cluster_peer() of an address outside the block's shared memory\n");
    std::abort();
  }
  return reinterpret_cast<V*>(t->cluster[rank] + offset);
}

}  // namespace cuda
}  // namespace cinc
