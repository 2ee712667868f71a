// The few GPU primitives the wavefront kernels use beyond plain C++, each with a host counterpart in
// tests/cuda_emulation/cuda_host_emulation.h (which must be included first when the kernels are built for the CPU):
//
//   ld(p), st(p, v)            a load / store. On the GPU exactly `*p` / `*p = v`; the emulation counts the
//                              shared-memory ones per warp-wide access (bank conflicts) and per thread and phase
//                              (utilisation), which is why the kernels route their shared-memory traffic through them,
//                              and checks that every 16-byte access is 16-byte aligned (the GPU faults otherwise).
//   Vec<T>                     16 bytes of T (4 floats, 2 doubles), 16-byte aligned: one 128-bit access.
//   block_shared_memory()      the block's dynamic shared memory.
//   cluster_barrier()          barrier.cluster (arrive with release, wait with acquire) across a thread-block
//                              cluster (sm_90): orders shared-memory and global accesses of all its blocks.
//   cluster_peer(p, rank)      the address of `p`'s counterpart in the shared memory of block `rank` of the cluster
//                              (distributed shared memory, sm_90); only stored to, never loaded from, by the kernels.
//   allow_dependent_launch()   griddepcontrol.launch_dependents / .wait (sm_90, programmatic dependent launch): the
//   wait_for_prerequisites()   next kernel in the stream may start before this one ends, and waits, where it says,
//                              for the grids it depends on to finish and their writes to be visible. Without the
//                              launch attribute, and before sm_90, both do nothing; the emulation runs kernels one
//                              after the other.
#pragma once

#include <cstdint>

#include "../cinc_math.h"

namespace cinc {
namespace cuda {

template <typename T>
constexpr int kVecElements = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVecElements<T>];
};

template <typename T>
CINC_HD Vec<T> zero_vec() {
  Vec<T> z;
  CINC_UNROLL
  for (int e = 0; e < kVecElements<T>; ++e) z.v[e] = T(0);
  return z;
}

#if defined(__CUDACC__)

template <typename V>
__device__ __forceinline__ V ld(const V* p) {
  return *p;
}

template <typename V>
__device__ __forceinline__ void st(V* p, const V& v) {
  *p = v;
}

__device__ __forceinline__ unsigned char* block_shared_memory() {
  extern __shared__ __align__(16) unsigned char wavefront_shared_bytes[];
  return wavefront_shared_bytes;
}

// The cluster kernels are launched on sm_90 only (the launcher checks the device); other targets compile a trap.
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

template <typename V>
__device__ __forceinline__ V* cluster_peer(V* p, unsigned int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<V*>(__cluster_map_shared_rank(p, rank));
#else
  (void)rank;
  return p;
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace cinc
