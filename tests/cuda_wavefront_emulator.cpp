// Runs the CUDA wavefront's block schedule (csrc/cuda/cinc_wavefront_block.h) on the CPU: the same steps in the
// same order, with a loop standing in for the threads of a block (run backwards, so a step that wrongly depended
// on another item of the same step would see stale data). tests/test_cuda.py compiles it with the host compiler
// and compares its output with the float64 reference; no GPU and no torch needed.
//
// Usage: cuda_wavefront_emulator DTYPE B C H W k unit_diagonal adjoint has_bias limit_elements channels_last
//   DTYPE is float or double; stdin: weight (C·C·k·k), bias (C, if has_bias), rhs (B·C·H·W in NCHW order) as
//   float64; stdout: the solution (B·C·H·W, NCHW) as float64, preceded by the layout chosen (3 int64:
//   use_ring, weight_in_shared, total_elements).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/cinc_wavefront_block.h"

using namespace cinc;
using namespace cinc::cuda;

template <typename T, bool kAdjoint, bool kRing>
void run_block(const WavefrontParams<T>& p, T* shared_base, int64_t image) {
  const WavefrontShared<T> s(shared_base, p);
  for (int64_t e = wavefront_fill_items(p) - 1; e >= 0; --e) wavefront_prologue_fill(p, s, e);
  for (int64_t col = p.C - 1; col >= 0; --col) wavefront_prologue_solve(p, s, col);
  for (int64_t step = 0; step < p.H + p.W - 1; ++step) {
    const DiagonalSpan span = wavefront_diagonal(p, step, kAdjoint);
    for (int t = wavefront_residual_items(span.count, p.C) - 1; t >= 0; --t) {
      wavefront_residual<T, kAdjoint, kRing>(p, s, image, span, t);
    }
    const int items = span.count * static_cast<int>(p.C);
    for (int t = items - 1; t >= 0; --t) wavefront_solve<T, kAdjoint, kRing>(p, s, image, span, t);
  }
}

std::vector<double> read_doubles(size_t n) {
  std::vector<double> v(n);
  if (n && std::fread(v.data(), sizeof(double), n, stdin) != n) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}

template <typename T>
int run(char** argv) {
  const int64_t B = std::atoll(argv[2]), C = std::atoll(argv[3]), H = std::atoll(argv[4]), W = std::atoll(argv[5]);
  const int k = std::atoi(argv[6]);
  const bool unit = std::atoi(argv[7]), adjoint = std::atoi(argv[8]), has_bias = std::atoi(argv[9]);
  const int64_t limit = std::atoll(argv[10]);
  const bool channels_last = std::atoi(argv[11]);

  const std::vector<double> wd = read_doubles(C * C * k * k);
  const std::vector<double> bd = read_doubles(has_bias ? C : 0);
  const std::vector<double> rd = read_doubles(B * C * H * W);
  std::vector<T> weight(wd.begin(), wd.end()), bias(bd.begin(), bd.end()), rhs(rd.size());
  std::vector<T> out(rd.size(), T(0) / T(0));  // poisoned too: the global-memory path reads it back
  // Store rhs in the requested layout and describe it with strides, as the kernel receives it.
  int64_t sb = C * H * W, sc = H * W, sh = W, sw = 1;
  if (channels_last) sc = 1, sw = C, sh = W * C;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) rhs[b * sb + c * sc + i * sh + j * sw] = T(rd[((b * C + c) * H + i) * W + j]);

  const WavefrontLayout layout = wavefront_layout(C, H, W, k, limit);
  if (!layout.fits) {
    std::fprintf(stderr, "does not fit\n");
    return 3;
  }
  WavefrontParams<T> p;
  p.rhs = rhs.data();
  p.rhs_stride_b = sb;
  p.rhs_stride_c = sc;
  p.rhs_stride_h = sh;
  p.rhs_stride_w = sw;
  p.bias = has_bias ? bias.data() : nullptr;
  p.weight = weight.data();
  p.out = out.data();
  p.C = C;
  p.H = H;
  p.W = W;
  p.k = k;
  p.unit_diagonal = unit;
  p.ring_slots = ring_slots_for(k);
  p.max_diagonal = H < W ? H : W;
  p.work_elements = layout.work_elements;
  p.use_ring = layout.use_ring;
  p.weight_in_shared = layout.weight_in_shared;
  // Poisoned shared memory: anything read before it is written shows up as a NaN in the output.
  std::vector<T> shared(layout.total_elements, T(0) / T(0));
  for (int64_t b = 0; b < B; ++b) {
    if (adjoint) {
      layout.use_ring ? run_block<T, true, true>(p, shared.data(), b) : run_block<T, true, false>(p, shared.data(), b);
    } else {
      layout.use_ring ? run_block<T, false, true>(p, shared.data(), b)
                      : run_block<T, false, false>(p, shared.data(), b);
    }
  }
  const int64_t header[3] = {layout.use_ring, layout.weight_in_shared, layout.total_elements};
  std::fwrite(header, sizeof(int64_t), 3, stdout);
  std::vector<double> result(out.begin(), out.end());
  std::fwrite(result.data(), sizeof(double), result.size(), stdout);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s DTYPE B C H W k unit_diagonal adjoint has_bias limit_elements channels_last\n",
                 argv[0]);
    return 2;
  }
  if (std::strcmp(argv[1], "float") == 0) return run<float>(argv);
  if (std::strcmp(argv[1], "double") == 0) return run<double>(argv);
  std::fprintf(stderr, "DTYPE must be float or double\n");
  return 2;
}
