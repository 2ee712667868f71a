// What the thread blocks of the CUDA wavefront do, as plain __host__ __device__ steps, and the launch plan.
//
// The kernels (cinc_wavefront_kernel.cuh) run these steps with their threads and a barrier between them
// (tests/cuda_emulation/ runs those kernels on CPU threads). Every step touches only the item it is given; items of
// one step are independent, which is why a barrier between steps is all a block (or a cluster of blocks) needs.
//
// The arithmetic. With L the masked centre tap (lower triangular), the inverse solves, pixel by pixel along the
// anti-diagonals, L x_p = y_p - bias - Σ_{taps ≠ centre} W_tap x_{p + δ(tap)}. Multiplying through by L⁻¹ once per call:
//     x_p = L⁻¹ (y_p - bias) + Σ_{taps ≠ centre} A_tap x_{p + δ(tap)},   A_tap = -L⁻¹ W_tap,
// so the channel substitution disappears into one sum over (tap, input channel) with the coefficients
// A[tap][c][o] (the centre "tap" holds L⁻¹ and reads y - bias). Every output channel of a pixel is then independent
// of the others on its diagonal: the blocks of a cluster can own disjoint output channels and need each other only
// for the neighbours on earlier diagonals — one exchange and one cluster barrier per diagonal. The adjoint is the same
// with u_p = L⁻ᵀ g_p + Σ A'_tap u_{p - δ(tap)}, A'_tap = -(W_tap L⁻¹)ᵀ, walked from the bottom-right corner.
// wavefront_coefficients_kernel computes A (k²·C³ multiply-adds, once per call) into a global workspace.
//
// Per diagonal, a block (channels [o_begin, o_begin + groups·kChannelBlock) of one image):
//   A. partial sums: the (tap, input chunk) sum is split into slices, as many as keep the threads busy; a thread item
//      is kPixelBlock pixels × kChannelBlock output channels of one slice, its inputs 16-byte vectors of kVec channels
//      from the ring (neighbours) or the staging slot (y - bias), its coefficients 16-byte vectors of A. Lanes of a
//      warp take consecutive pixel groups, then output groups, then slices (which take neighbouring chunks): the
//      layouts below spread every warp-wide access over the banks (tests/test_cuda_emulated.py counts them).
//      Also in this phase: the previous diagonal's finished row groups go to the output (16-byte stores of
//      kStoreGroup pixels), and the next diagonal's y - bias, loaded into registers during the previous phase B,
//      goes to its staging slot.
//   barrier
//   B. the slices' partial sums are added; the result goes into this block's ring and, in a cluster, into every
//      other block's ring (distributed shared memory: stores only, so every load of the kernel is a local one); the
//      diagonal's guard rows are zeroed; the right-hand side two diagonals ahead is loaded into registers.
//   barrier (a cluster barrier in a cluster)
//
// Ring: [slot][row][channel], slot = diagonal mod ring_slots_for(k), rows -(k-1) … H+k+kPixelBlock-3 (rows of zeros
// above and below the image), channels padded to a conflict-free stride, plus two staging slots (y - bias of this and
// the next diagonal). Writing a diagonal also zeroes its k-1 rows before and after (its "guard" rows: a neighbour
// outside the image on the left or right lies on one of them), so every neighbour a pixel reads exists and is zero
// outside the image: the hot loop reads its rows without masks, and the lanes of a warp read regularly spaced words.
// It lives in shared memory when it fits and in a global workspace (one per image) otherwise; the coefficients
// likewise.
#pragma once

#include <cstdint>

#include "../cinc_math.h"
#include "cinc_device.h"

namespace cinc {
namespace cuda {

constexpr int kPixelBlock = 4;    // pixels per thread item
constexpr int kChannelBlock = 4;  // output channels per thread item (a multiple of every kVec)
constexpr int kStoreGroup = 4;    // consecutive pixels of an output row written together

template <typename T>
constexpr int kVec = kVecElements<T>;

// Diagonal d's neighbours lie on d-1 … d-2(k-1). A peer in the cluster may write diagonal d+1 into this block's ring
// while this block still reads the neighbours of d+1, so the slot of d+1 must not be one of them: 2k-1 slots. The
// output stores read the last kStoreGroup diagonals of the block's own channels.
CINC_HD int ring_slots_for(int k) {
  const int neighbours = 2 * k - 1;
  return neighbours > kStoreGroup ? neighbours : kStoreGroup;
}

// A row stride ≥ n elements of 3 or 5 (mod 8) 16-byte vectors, or (`tight`) of an odd number of them. The hot loop's
// ring reads of a warp are 16-byte words at row · stride + chunk for a few consecutive rows (pixel groups) and
// consecutive chunks (slices): any odd stride spreads 8 consecutive rows of one slice over the 8 groups of 4 banks;
// ≡ 3 or 5 also keeps the next slice's rows off them (≡ 1 or 7 stacks row r + 1 of one slice on row r of the next).
template <typename T>
CINC_HD int conflict_free_stride(int64_t n, bool tight = false) {
  const int v = kVec<T>;
  int vectors = static_cast<int>((n + v - 1) / v);
  while (tight ? vectors % 2 == 0 : vectors % 8 != 3 && vectors % 8 != 5) ++vectors;
  return vectors * v;
}

CINC_HD int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename T>
struct WavefrontParams {
  const T* rhs;  // y (inverse) or g (adjoint), any strides
  int64_t rhs_stride_b, rhs_stride_c, rhs_stride_h, rhs_stride_w;
  const T* bias;          // (C,) or nullptr
  const T* coefficients;  // [k²][padded_channels][padded_channels] from wavefront_coefficients_kernel
  T* out;                 // (B, C, H, W), contiguous
  T* ring_global;         // B rings of ring_elements when the ring is not in shared memory
  int64_t C, H, W;
  int k;
  int padded_channels;     // C rounded up to kChannelBlock
  int ring_stride;         // elements per ring row
  int ring_slots;          // ring_slots_for(k)
  int ring_rows;           // rows per slot: H + 2(k-1) + kPixelBlock-1
  int64_t ring_elements;   // (ring_slots + 2 staging slots) · ring_rows · ring_stride
  int64_t partial_elements;
  int groups_total;        // padded_channels / kChannelBlock
  int groups_per_block;    // output-channel groups owned by each block of an image
  int blocks_per_image;
  int weight_stride;       // groups_per_block · kChannelBlock: a row of the shared coefficient copy
  int weight_chunk_stride; // a chunk (kVec rows) of the shared copy, padded (weight_chunk_stride_for)
  int64_t weight_elements; // the shared copy
  int max_diagonal;        // min(H, W)
};

// How the (tap, input chunk) sum of one diagonal is split: `splits` slices of `iterations` chunks (the last slices
// possibly one shorter), `items` thread items per slice; the threads take the splits × items items in `rounds`.
// Every item runs exactly `iterations` hot-loop iterations, so the lanes of a warp stay converged.
constexpr int kMaxRounds = 2;

struct DiagonalWork {
  int groups;      // pixel groups of kPixelBlock
  int items;       // groups × the block's output groups
  int splits;
  int iterations;
  int rounds;
  int chunks;      // (tap, input chunk) pairs: k² · padded_channels / kVec
};

// The splits that keep the threads busiest: the fewest rounds × iterations among the slice counts that fill one or
// kMaxRounds rounds of threads (with items > threads two rounds of many slices can beat one round of few; ties: fewer
// slices, hence fewer partial sums to add and to keep).
template <typename T>
CINC_HD DiagonalWork diagonal_work(int count, int output_groups, int threads, int k, int padded_channels) {
  DiagonalWork w;
  w.groups = (count + kPixelBlock - 1) / kPixelBlock;
  w.items = w.groups * output_groups;
  w.chunks = k * k * (padded_channels / kVec<T>);
  int best = 0;
  for (int r = 1; r <= kMaxRounds; ++r) {
    int splits = r * threads / w.items;
    if (splits < 1) splits = 1;
    if (splits > w.chunks) splits = w.chunks;
    const int iterations = (w.chunks + splits - 1) / splits;
    splits = (w.chunks + iterations - 1) / iterations;  // as many slices as that length needs
    const int rounds = (splits * w.items + threads - 1) / threads;
    if (best == 0 || rounds * iterations < best) {
      best = rounds * iterations;
      w.splits = splits;
      w.iterations = iterations;
      w.rounds = rounds;
    }
  }
  return w;
}

// The share of thread-iterations of the hot loop that do work (a slice's iteration past the last tap counts as work:
// its loads run), over the diagonals of an image: Σ items · iterations / Σ threads · rounds · iterations.
template <typename T>
CINC_HD double hot_loop_utilisation(int64_t H, int64_t W, int output_groups, int threads, int k, int padded) {
  double busy = 0, offered = 0;
  for (int64_t d = 0; d < H + W - 1; ++d) {
    const int64_t first = d - (W - 1) > 0 ? d - (W - 1) : 0, last = d < H - 1 ? d : H - 1;
    const DiagonalWork w = diagonal_work<T>(static_cast<int>(last - first + 1), output_groups, threads, k, padded);
    busy += static_cast<double>(w.splits) * w.items * w.iterations;
    offered += static_cast<double>(threads) * w.rounds * w.iterations;
  }
  return busy / offered;
}

// Pixels per output vector in the partial sums (see wavefront_partial_sums).
CINC_HD int64_t partial_rows(const DiagonalWork& w) { return static_cast<int64_t>(w.groups) * kPixelBlock + 1; }

// The pixels (first + n', d - first - n'), n' < count, of anti-diagonal d.
struct DiagonalSpan {
  int64_t d;
  int64_t first;
  int count;
};

template <typename T>
CINC_HD DiagonalSpan wavefront_diagonal(const WavefrontParams<T>& p, int64_t step, bool adjoint) {
  const int64_t d = adjoint ? p.H + p.W - 2 - step : step;
  const int64_t first = d - (p.W - 1) > 0 ? d - (p.W - 1) : 0;
  const int64_t last = d < p.H - 1 ? d : p.H - 1;
  return {d, first, static_cast<int>(last - first + 1)};
}

// One block's view: its image, its output channels and where its buffers are.
template <typename T>
struct WavefrontBlock {
  int64_t image;
  int rank;
  int groups;   // output groups this block owns (the last block of an image may own fewer)
  int o_begin;  // first output channel
  int owned;    // output channels < C this block owns
  T* partial;   // shared memory
  T* ring;      // shared memory or this image's global ring
  // The coefficient of input channel chunk·kVec + e and output channel o_begin + og·kChannelBlock + u·kVec + v is
  // weights[chunk · chunk_stride + e · row_stride + u · vector_stride + og · group_stride + v], for the shared copy
  // ([k² · chunks][kVec rows][kChannelBlock/kVec vectors][groups], chunks padded: weight_chunk_stride_for) or the
  // global coefficients ([k² · padded_channels][padded_channels], offset to the block's first channel).
  const T* weights;
  int weight_chunk_stride;
  int weight_row_stride;
  int weight_vector_stride;
  int weight_group_stride;

  // Image row `row` (-(k-1) ≤ row < H + k-1 + kPixelBlock-1) of the slot of `diagonal`.
  CINC_HD T* ring_row(const WavefrontParams<T>& p, int64_t diagonal, int64_t row) const {
    const int64_t slot = ((diagonal % p.ring_slots) + p.ring_slots) % p.ring_slots;
    return ring + (slot * p.ring_rows + row + p.k - 1) * p.ring_stride;
  }
  CINC_HD T* staging_row(const WavefrontParams<T>& p, int64_t step, int64_t row) const {
    return ring + ((p.ring_slots + (step & 1)) * p.ring_rows + row + p.k - 1) * p.ring_stride;
  }
};

template <typename T, bool kRingShared, bool kWeightsShared>
CINC_HD WavefrontBlock<T> wavefront_block(const WavefrontParams<T>& p, unsigned char* shared, int64_t image,
                                          int rank) {
  WavefrontBlock<T> b;
  b.image = image;
  b.rank = rank;
  const int first_group = rank * p.groups_per_block;
  const int left = p.groups_total - first_group;
  b.groups = left < p.groups_per_block ? left : p.groups_per_block;
  b.o_begin = first_group * kChannelBlock;
  const int64_t end = b.o_begin + static_cast<int64_t>(b.groups) * kChannelBlock;
  b.owned = static_cast<int>((end < p.C ? end : p.C) - b.o_begin);
  T* base = reinterpret_cast<T*>(shared);
  b.partial = base;
  b.ring = kRingShared ? base + p.partial_elements : p.ring_global + image * p.ring_elements;
  if (kWeightsShared) {
    b.weights = base + p.partial_elements + p.ring_elements;
    b.weight_chunk_stride = p.weight_chunk_stride;
    b.weight_row_stride = p.weight_stride;
    b.weight_vector_stride = p.groups_per_block * kVec<T>;
    b.weight_group_stride = kVec<T>;
  } else {
    b.weights = p.coefficients + b.o_begin;
    b.weight_chunk_stride = kVec<T> * p.padded_channels;
    b.weight_row_stride = p.padded_channels;
    b.weight_vector_stride = kVec<T>;
    b.weight_group_stride = kChannelBlock;
  }
  return b;
}

// The shared coefficient copy's chunk stride: kVec rows of weight_stride, padded to ≡ `groups` (mod 8) 16-byte words.
// One load instruction of a warp reads, for each slice s in it (consecutive chunks), the 16-byte words of its output
// groups og < groups, contiguous (the layout puts the groups innermost): s · stride + og. With stride ≡ groups the
// slices' words tile the 8 groups of 4 banks evenly.
template <typename T>
CINC_HD int weight_chunk_stride_for(int weight_stride, int groups) {
  const int chunk = kVec<T> * weight_stride / kVec<T>;  // in 16-byte words
  const int pad = ((groups - chunk) % 8 + 8) % 8;
  return (chunk + pad) * kVec<T>;
}

// ---------------------------------------------------------------------------------------------------------------
// Prologue

// Item e < ring_elements / kVec: the ring starts as zeros (the rows outside the image stay so, and the slots of the
// diagonals before the first are read as such; channels past C are read with zero coefficients).
template <typename T>
CINC_HD void wavefront_zero_ring(const WavefrontBlock<T>& b, int64_t e) {
  st(reinterpret_cast<Vec<T>*>(b.ring) + e, zero_vec<T>());
}

// Item e < weight_copy_items: one 16-byte vector of the block's columns of the coefficients (zero past them).
template <typename T>
CINC_HD int64_t weight_copy_items(const WavefrontParams<T>& p) {
  return static_cast<int64_t>(p.k) * p.k * p.padded_channels * (p.weight_stride / kVec<T>);
}

template <typename T>
CINC_HD void wavefront_copy_weights(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, T* shared_weights,
                                    int64_t e) {
  const int per_row = p.weight_stride / kVec<T>;
  const int64_t row = e / per_row;  // tap · padded_channels + input channel
  const int column = static_cast<int>(e % per_row) * kVec<T>;
  Vec<T> v = zero_vec<T>();
  if (b.o_begin + column < p.padded_channels) {
    v = ld(reinterpret_cast<const Vec<T>*>(p.coefficients + row * p.padded_channels + b.o_begin + column));
  }
  const int og = column / kChannelBlock, u = (column % kChannelBlock) / kVec<T>;
  T* to = shared_weights + (row / kVec<T>) * p.weight_chunk_stride + (row % kVec<T>) * p.weight_stride +
          u * p.groups_per_block * kVec<T> + og * kVec<T>;
  st(reinterpret_cast<Vec<T>*>(to), v);
}

// Item e < count · C of a diagonal: pixel e / C, channel e % C (lanes take consecutive channels: consecutive words).
template <typename T, bool kAdjoint>
CINC_HD T staged_value(const WavefrontParams<T>& p, int64_t image, DiagonalSpan span, int e) {
  const int C = static_cast<int>(p.C);
  const int pix = e / C, c = e % C;
  const int64_t i = span.first + pix, j = span.d - i;
  T v = p.rhs[image * p.rhs_stride_b + c * p.rhs_stride_c + i * p.rhs_stride_h + j * p.rhs_stride_w];
  if (!kAdjoint && p.bias != nullptr) v -= p.bias[c];
  return v;
}

template <typename T>
CINC_HD void stage_value(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, DiagonalSpan span, int64_t step,
                         int e, T v) {
  const int C = static_cast<int>(p.C);
  const int pix = e / C, c = e % C;
  st(b.staging_row(p, step, span.first + pix) + c, v);
}

// ---------------------------------------------------------------------------------------------------------------
// Phase A: partial sums of one thread item

// The slices are interleaved: slice s takes chunks s, s + splits, s + 2·splits, … (chunk q is input channels
// (q mod chunks_per_tap)·kVec of tap q div chunks_per_tap), so the slices that share a warp read neighbouring chunks at
// every iteration: neighbouring 16-byte words of one ring row, and coefficient chunks an odd number of 16-byte words
// apart. Both spread over the banks.
template <typename T, bool kAdjoint>
CINC_HD void wavefront_partial_sums(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, DiagonalSpan span,
                                    int64_t step, const DiagonalWork& w, int item) {
  constexpr int V = kVec<T>, P = kPixelBlock, Q = kChannelBlock, QV = kChannelBlock / kVec<T>;
  const int split = item / w.items, within = item % w.items;
  const int group = within % w.groups, og = within / w.groups;
  const int k = p.k, taps = k * k, dir = kAdjoint ? -1 : 1;
  const int chunks_per_tap = p.padded_channels / V;

  // Lanes of a warp: consecutive groups, so consecutive pixels. A group's pixels past the diagonal (up to
  // kPixelBlock-1 rows past it) compute sums that are never read, from rows that exist.
  int64_t row[P];
  CINC_UNROLL
  for (int m = 0; m < P; ++m) row[m] = span.first + group + m * w.groups;
  T acc[P][Q];
  CINC_UNROLL
  for (int m = 0; m < P; ++m) {
    CINC_UNROLL
    for (int q = 0; q < Q; ++q) acc[m][q] = T(0);
  }

  // chunk q = tap · chunks_per_tap + chunk; it advances by `splits` = taps_per_step taps and chunks_per_step chunks.
  const int taps_per_step = w.splits / chunks_per_tap, chunks_per_step = w.splits % chunks_per_tap;
  int q = split, tap = split / chunks_per_tap, chunk = split % chunks_per_tap, a = tap / k, bb = tap % k;
  const int64_t slot_d = span.d % p.ring_slots;
  const T* x_row[P];
  bool new_tap = true;
  for (int it = 0; it < w.iterations; ++it) {
    if (new_tap) {
      // The neighbours (row + di, col + dj) lie on diagonal d + di + dj, within ring_slots of d. Outside the image
      // they read the zeros of the rows above and below it or of the diagonal's guard rows. Past the last tap (a
      // slice's last iteration) the centre tap's words again, so that the warp's words stay regularly spaced; they
      // count as zero.
      const bool live = tap < taps;
      const int64_t di = live ? dir * (a - (k - 1)) : 0, dj = live ? dir * (bb - (k - 1)) : 0;
      const bool centre = di == 0 && dj == 0;
      int64_t slot = slot_d + di + dj;
      slot += slot < 0 ? p.ring_slots : (slot >= p.ring_slots ? -p.ring_slots : 0);
      const T* base = centre ? b.staging_row(p, step, 0) : b.ring + (slot * p.ring_rows + di + k - 1) * p.ring_stride;
      CINC_UNROLL
      for (int m = 0; m < P; ++m) x_row[m] = base + row[m] * p.ring_stride;
    }
    const int c = chunk * V;
    const T* w_chunk = b.weights + static_cast<int64_t>(q < w.chunks ? q : w.chunks - 1) * b.weight_chunk_stride +
                       og * b.weight_group_stride;
    Vec<T> x[P];
    CINC_UNROLL
    for (int m = 0; m < P; ++m) x[m] = ld(reinterpret_cast<const Vec<T>*>(x_row[m] + c));
    if (tap >= taps) {
      CINC_UNROLL
      for (int m = 0; m < P; ++m) x[m] = zero_vec<T>();
    }
    CINC_UNROLL
    for (int e = 0; e < V; ++e) {
      Vec<T> coefficient[QV];
      CINC_UNROLL
      for (int u = 0; u < QV; ++u) {
        coefficient[u] = ld(reinterpret_cast<const Vec<T>*>(w_chunk + e * b.weight_row_stride +
                                                             u * b.weight_vector_stride));
      }
      CINC_UNROLL
      for (int m = 0; m < P; ++m) {
        CINC_UNROLL
        for (int qq = 0; qq < Q; ++qq) acc[m][qq] += x[m].v[e] * coefficient[qq / V].v[qq % V];
      }
    }
    q += w.splits;
    chunk += chunks_per_step;
    int next = taps_per_step;
    if (chunk >= chunks_per_tap) {
      chunk -= chunks_per_tap;
      ++next;
    }
    tap += next;
    for (bb += next; bb >= k; bb -= k) ++a;
    new_tap = next > 0;
  }

  // Partial sums [slice][vector of kVec output channels][pixel], so that lanes (consecutive pixels) store consecutive
  // 16-byte words, and an odd number of pixels per vector, so that lanes of one pixel group (consecutive vectors)
  // store words an odd distance apart. Pixels past the diagonal have words of their own (never read).
  const int64_t rows = partial_rows(w);
  CINC_UNROLL
  for (int m = 0; m < P; ++m) {
    const int64_t pix = group + m * w.groups;
    CINC_UNROLL
    for (int u = 0; u < QV; ++u) {
      Vec<T> v;
      CINC_UNROLL
      for (int e = 0; e < V; ++e) v.v[e] = acc[m][u * V + e];
      const int64_t vector = (static_cast<int64_t>(split) * b.groups + og) * QV + u;
      st(reinterpret_cast<Vec<T>*>(b.partial) + vector * rows + pix, v);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase B: the solution of one 16-byte vector of channels of one pixel

// Item e < count · (groups · kChannelBlock / kVec): pixel e % count, vector e / count. Returns the vector (its
// channels past C zeroed: the hot loop reads them with zero coefficients, and they must stay finite) and where it
// goes in the ring; the kernel stores it there and into the cluster's other rings.
template <typename T>
struct SolvedVector {
  Vec<T> value;
  int64_t ring_offset;  // from the ring's start
};

template <typename T>
CINC_HD SolvedVector<T> wavefront_reduce(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, DiagonalSpan span,
                                         const DiagonalWork& w, int e) {
  constexpr int V = kVec<T>;
  const int vectors = b.groups * kChannelBlock / V;
  const int pix = e % span.count, u = e / span.count;  // lanes: consecutive pixels, consecutive 16-byte words
  const int64_t rows = partial_rows(w);
  Vec<T> sum = zero_vec<T>();
  for (int s = 0; s < w.splits; ++s) {
    const Vec<T>* slice = reinterpret_cast<const Vec<T>*>(b.partial) + static_cast<int64_t>(s) * vectors * rows;
    const Vec<T> v = ld(slice + u * rows + pix);
    CINC_UNROLL
    for (int x = 0; x < V; ++x) sum.v[x] += v.v[x];
  }
  const int o = b.o_begin + u * V;
  CINC_UNROLL
  for (int x = 0; x < V; ++x) sum.v[x] = o + x < p.C ? sum.v[x] : T(0);
  return {sum, b.ring_row(p, span.d, span.first + pix) + o - b.ring};
}

// Item e < guard_items: zeroes a 16-byte vector of one of the k-1 rows before or after diagonal d in its slot.
template <typename T>
CINC_HD int64_t guard_items(const WavefrontParams<T>& p) {
  return 2 * static_cast<int64_t>(p.k - 1) * (p.padded_channels / kVec<T>);
}

template <typename T>
CINC_HD void wavefront_zero_guard(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, DiagonalSpan span,
                                  int64_t e) {
  const int vectors = p.padded_channels / kVec<T>;
  const int g = static_cast<int>(e / vectors), v = static_cast<int>(e % vectors);
  const int64_t row = g < p.k - 1 ? span.first - (p.k - 1) + g : span.first + span.count + (g - (p.k - 1));
  if (row < -(p.k - 1) || row >= p.ring_rows - (p.k - 1)) return;  // past the slot: nothing there to clear
  st(reinterpret_cast<Vec<T>*>(b.ring_row(p, span.d, row)) + v, zero_vec<T>());
}

// ---------------------------------------------------------------------------------------------------------------
// Output: after diagonal d, every row whose group of kStoreGroup columns d completes is written from the ring.

// The rows of a diagonal whose group is complete after it: the inverse completes group [j0, j0 + 3] at its last
// column (j ≡ 3 mod kStoreGroup, or the image's last column), the adjoint at its first (j ≡ 0). These rows are every
// kStoreGroup-th row of the diagonal, plus, for the inverse, its first row when that reaches the last column.
struct StoreRows {
  int64_t first;  // first regular row
  int regular;    // rows first, first + kStoreGroup, …
  int edge;       // 1: also the diagonal's first row (listed first)
};

template <typename T, bool kAdjoint>
CINC_HD StoreRows wavefront_store_rows(const WavefrontParams<T>& p, DiagonalSpan span) {
  // (d - i) mod kStoreGroup == residue picks the rows
  const int64_t residue = kAdjoint ? 0 : kStoreGroup - 1;
  const int64_t want = ((span.d - residue) % kStoreGroup + kStoreGroup) % kStoreGroup;  // i ≡ want
  const int64_t offset = ((want - span.first) % kStoreGroup + kStoreGroup) % kStoreGroup;
  StoreRows r;
  r.first = span.first + offset;
  r.regular = offset < span.count ? static_cast<int>((span.count - offset + kStoreGroup - 1) / kStoreGroup) : 0;
  r.edge = !kAdjoint && span.d >= p.W - 1 && (p.W - 1) % kStoreGroup != residue ? 1 : 0;
  return r;
}

// Item e < (rows.regular + rows.edge) · owned: a row and one of the block's channels (lanes: consecutive channels).
template <typename T>
CINC_HD void wavefront_store_group(const WavefrontParams<T>& p, const WavefrontBlock<T>& b, DiagonalSpan span,
                                   StoreRows rows, int e) {
  const int n = e / b.owned, c = b.o_begin + e % b.owned;
  const int64_t i = n < rows.edge ? span.first : rows.first + static_cast<int64_t>(n - rows.edge) * kStoreGroup;
  const int64_t j = span.d - i;
  const int64_t j0 = j - j % kStoreGroup;
  const int64_t j1 = j0 + kStoreGroup - 1 < p.W - 1 ? j0 + kStoreGroup - 1 : p.W - 1;
  T values[kStoreGroup];
  CINC_UNROLL
  for (int g = 0; g < kStoreGroup; ++g) {
    const int64_t jj = j0 + g <= j1 ? j0 + g : j1;  // a short group (the row's end) reloads its last pixel
    values[g] = ld(b.ring_row(p, i + jj, i) + c);
  }
  T* out = p.out + ((b.image * p.C + c) * p.H + i) * p.W + j0;
  if (j1 - j0 + 1 == kStoreGroup && p.W % kStoreGroup == 0) {
    // A whole group at a multiple of kStoreGroup of a row of a multiple of kStoreGroup: 16-byte aligned vectors.
    constexpr int vectors = kStoreGroup / kVec<T>;
    CINC_UNROLL
    for (int u = 0; u < vectors; ++u) {
      Vec<T> v;
      CINC_UNROLL
      for (int x = 0; x < kVec<T>; ++x) v.v[x] = values[u * kVec<T> + x];
      st(reinterpret_cast<Vec<T>*>(out + u * kVec<T>), v);
    }
  } else {
    CINC_UNROLL
    for (int g = 0; g < kStoreGroup; ++g) {
      if (g <= j1 - j0) out[g] = values[g];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The coefficients A (see the top of this file), one block per (tap, chunk of entries)

// Rows of L and L⁻¹ in shared memory at an odd stride: a warp reading a column (lanes along rows) and a warp reading
// a row (lanes along columns) both hit 32 different banks.
CINC_HD int64_t odd_stride(int64_t C) { return C % 2 == 1 ? C : C + 1; }

// Solve L x = e_col in place in column `col` of `inverse` (row stride `stride`): solve_lower_in_place's operations in
// its order, on a strided column (so that the threads solving consecutive columns touch consecutive words).
template <typename Acc>
CINC_HD void solve_lower_column(const Acc* centre, Acc* inverse, int64_t stride, int64_t C, int64_t col) {
  for (int64_t j = 0; j < C; ++j) {
    const Acc xj = inverse[j * stride + col] / centre[j * stride + j];
    inverse[j * stride + col] = xj;
    for (int64_t i = j + 1; i < C; ++i) inverse[i * stride + col] -= centre[i * stride + j] * xj;
  }
}

// Entry e < padded² of tap `tap`: A[tap][c][o], c = e / padded (input channel), o = e % padded (output channel), from
// L⁻¹ (`inverse`, row-major at `stride`) and the raw weight. Lanes take consecutive o.
template <typename T, bool kAdjoint>
CINC_HD T wavefront_coefficient(const T* weight, const T* inverse, int64_t stride, int64_t C, int k, int padded,
                                int tap, int e) {
  const int64_t c = e / padded, o = e % padded;
  if (c >= C || o >= C) return T(0);
  const int kk = k * k;
  if (tap == kk - 1) return kAdjoint ? inverse[c * stride + o] : inverse[o * stride + c];
  T sum = T(0);
  if (kAdjoint) {
    // -Σ_{m ≥ o} W[c, m, tap] L⁻¹[m, o]: the neighbour's channel c feeds output o through every m it reaches.
    for (int64_t m = o; m < C; ++m) sum += weight[(c * C + m) * kk + tap] * inverse[m * stride + o];
  } else {
    // -Σ_{m ≤ o} L⁻¹[o, m] W[m, c, tap]
    for (int64_t m = 0; m <= o; ++m) sum += inverse[o * stride + m] * weight[(m * C + c) * kk + tap];
  }
  return -sum;
}

// ---------------------------------------------------------------------------------------------------------------
// The launch plan

// What a launch may use on one device.
struct WavefrontDevice {
  int multiprocessors;
  int64_t shared_per_block;           // opt-in maximum per block
  int64_t shared_per_multiprocessor;  // all blocks of an SM together
  int max_cluster;                    // blocks per cluster: 8 on sm_90 (the portable maximum), 1 before
};

struct WavefrontPlan {
  bool fits;                  // the coefficient kernel's L and L⁻¹ and one diagonal's partial sums fit
  int blocks_per_image;       // a cluster of this many blocks per image when > 1
  int threads;
  bool ring_in_shared;
  bool weights_in_shared;
  int64_t shared_bytes;       // per block of the wavefront kernel
  int64_t coefficient_shared_bytes;
  int coefficient_chunks;     // grid.y of the coefficient kernel
  int64_t coefficient_elements;  // global workspace
  int64_t ring_global_elements;  // per image, when the ring is not in shared memory
};

constexpr int kCoefficientThreads = 256;
constexpr int kCoefficientEntriesPerThread = 4;

// The partial sums' size: the most any diagonal needs, for a block owning `groups` output groups.
template <typename T>
CINC_HD int64_t partial_elements_for(int max_diagonal, int groups, int threads, int k, int padded) {
  int64_t most = 0;
  for (int n = 1; n <= max_diagonal; ++n) {
    const DiagonalWork w = diagonal_work<T>(n, groups, threads, k, padded);
    const int64_t need = w.splits * partial_rows(w) * groups * kChannelBlock;
    if (need > most) most = need;
  }
  return round_up(most, kVec<T>);
}

}  // namespace cuda
}  // namespace cinc
