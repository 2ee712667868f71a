// Runs the CUDA kernels of csrc/cuda/*.cuh, as written, on CPU threads (cuda_host_emulation.h), for
// tests/test_cuda_emulated.py, which compares what comes back with cinc_kernels.reference.
//
//   run_kernels OP DTYPE key=value...     OP: forward | inverse | inverse_transpose | logdet
//   run_kernels plan DTYPE key=value...   the wavefront's launch plan only (no stdin)
//   run_kernels math
//   run_kernels selftest guard|race|cluster|cluster_race
//
// keys: B C H W k unit bias (0/1), strides=sb,sc,sh,sw offset storage (the input's view of its storage, in
// elements); the device: shared (shared memory per block, bytes), shared_sm (per SM), sms (multiprocessors),
// cluster (the largest cluster: 8 on sm_90, 1 before); the wavefront's forced threads and blocks per image (0: the
// plan's own), plan_batch (plan the launch for this batch while running B images), coefficient_threads (block size of the coefficient kernel), counters=PATH (count the wavefront
// kernel's shared-memory accesses and write them there as JSON).
// DTYPE: float | double, and for the forward also half | bfloat16.
// stdin: float64 weight (C·C·k·k), bias (C, when bias=1), input storage (storage elements; none for logdet).
// stdout: one line "key=value ..." describing the launch, then the float64 output (B·C·H·W, or 1 for logdet).
// A launch the device would refuse exits with status 3 and the reason on stderr.
//
// `selftest` runs a kernel that writes past its shared memory (guard) or races (race): both must fail; and a cluster
// of two blocks, one writing into the other's shared memory, with a cluster barrier (cluster: prints 1 … 32) or
// without one (cluster_race: must fail).
// `math` checks the functions of csrc/cinc_math.h that no other build compiles here (the block substitutions are
// compiled into the CPU kernels only off x86) against their one-pixel forms, bitwise, and prints "ok".
#include "cuda_host_emulation.h"

// The half types of the forward's float16/bfloat16 instantiations (header-only parts of c10).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/cinc_forward_kernel.cuh"
#include "cuda/cinc_wavefront_kernel.cuh"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <cstdlib>
#include <limits>
#include <map>
#include <type_traits>
#include <sstream>
#include <string>
#include <vector>

// Two kernels that break the rules on purpose, to show that the emulation notices (`run_kernels selftest NAME`).
namespace cinc {
namespace cuda {

// Writes one byte past the shared memory its launch asked for: the launch must fail.
__global__ void write_past_shared_memory(int bytes) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  if (threadIdx.x == 0) shared_bytes[bytes] = 0;
}

// Reads a neighbour's shared-memory word with no barrier after the neighbour wrote it: ThreadSanitizer must report it.
__global__ void read_without_barrier(int* out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  int* words = reinterpret_cast<int*>(shared_bytes);
  words[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = words[(threadIdx.x + 1) % blockDim.x];
}

// A cluster of two blocks: block 0 writes into block 1's shared memory (distributed shared memory), block 1 reads it
// back, with or without a cluster barrier between: without, ThreadSanitizer must report the race.
__global__ void push_to_peer(int* out, bool with_barrier) {
  int* words = reinterpret_cast<int*>(block_shared_memory());
  const unsigned int rank = blockIdx.x % 2;
  if (rank == 0) st(cluster_peer(words + threadIdx.x, 1), static_cast<int>(threadIdx.x) + 1);
  if (with_barrier) cluster_barrier();
  if (rank == 1) out[threadIdx.x] = ld(words + threadIdx.x);
}

}  // namespace cuda
}  // namespace cinc

namespace {

using cuda_emulation::Device;
using cuda_emulation::launch;
using cuda_emulation::LaunchError;

struct Args {
  std::map<std::string, std::string> values;
  int64_t get(const std::string& key, int64_t fallback) const {
    const auto it = values.find(key);
    return it == values.end() ? fallback : std::strtoll(it->second.c_str(), nullptr, 10);
  }
  std::vector<int64_t> list(const std::string& key) const {
    std::vector<int64_t> out;
    std::stringstream in(values.at(key));
    std::string item;
    while (std::getline(in, item, ',')) out.push_back(std::strtoll(item.c_str(), nullptr, 10));
    return out;
  }
};

std::vector<double> read_doubles(size_t n) {
  std::vector<double> out(n);
  if (n > 0 && std::fread(out.data(), sizeof(double), n, stdin) != n) {
    std::fprintf(stderr, "run_kernels: stdin ended before %zu values\n", n);
    std::exit(2);
  }
  return out;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  std::vector<T> out;
  out.reserve(v.size());
  for (const double d : v) {
    if constexpr (sizeof(T) < 4) {
      out.push_back(T(static_cast<float>(d)));  // the half types convert from float only
    } else {
      out.push_back(static_cast<T>(d));
    }
  }
  return out;
}

template <typename T>
void write_output(const std::string& header, const std::vector<T>& out) {
  std::printf("%s\n", header.c_str());
  std::vector<double> d;
  for (const T& v : out) d.push_back(static_cast<double>(static_cast<std::conditional_t<sizeof(T) < 4, float, T>>(v)));
  std::fwrite(d.data(), sizeof(double), d.size(), stdout);
}

struct Problem {
  int64_t B, C, H, W;
  int k;
  bool unit_diagonal, has_bias;
  std::vector<int64_t> strides;
  int64_t offset, storage;
  Device device;
  int64_t shared_per_multiprocessor;
  int64_t plan_batch;  // the batch the wavefront's launch is planned for (B unless asked)
};

template <typename T, typename Acc>
void run_forward(const Problem& pr, const std::vector<double>& weight, const std::vector<double>& bias,
                 const std::vector<double>& input) {
  using namespace cinc::cuda;
  const std::vector<T> w = cast<T>(weight), b = cast<T>(bias), x = cast<T>(input);
  std::vector<T> y(pr.B * pr.C * pr.H * pr.W, T(std::numeric_limits<float>::quiet_NaN()));
  ForwardParams<T> p;
  p.x = x.data() + pr.offset;
  p.x_stride_b = pr.strides[0];
  p.x_stride_c = pr.strides[1];
  p.x_stride_h = pr.strides[2];
  p.x_stride_w = pr.strides[3];
  p.weight = w.data();
  p.bias = pr.has_bias ? b.data() : nullptr;
  p.y = y.data();
  p.C = pr.C;
  p.H = pr.H;
  p.W = pr.W;
  p.k = pr.k;
  p.unit_diagonal = pr.unit_diagonal;
  int64_t tiles_h = 0;
  const ForwardLaunch l = configure_forward<T, Acc>(p, pr.B, &tiles_h);
  launch(forward_kernel<T, Acc>, dim3(static_cast<unsigned int>(l.blocks), static_cast<unsigned int>(l.groups)),
         dim3(l.tile_w, l.tile_h), l.shared_bytes, kMaxTileThreads, pr.device, p);
  std::ostringstream header;
  header << "tile_w=" << l.tile_w << " tile_h=" << l.tile_h << " blocks=" << l.blocks << " groups=" << l.groups
         << " shared=" << l.shared_bytes;
  write_output(header.str(), y);
}

// The wavefront's launch plan for a device described by the arguments (cinc_cuda_wavefront.cu asks the GPU).
cinc::cuda::WavefrontDevice wavefront_device(const Problem& pr, int multiprocessors) {
  return cinc::cuda::WavefrontDevice{multiprocessors, static_cast<int64_t>(pr.device.shared_bytes_per_block),
                                     pr.shared_per_multiprocessor, pr.device.max_cluster};
}

template <typename T>
std::string plan_text(const cinc::cuda::WavefrontPlan& plan, const cinc::cuda::WavefrontParams<T>& p) {
  std::ostringstream out;
  out << "fits=" << plan.fits << " blocks_per_image=" << plan.blocks_per_image << " threads=" << plan.threads
      << " ring_in_shared=" << plan.ring_in_shared << " weights_in_shared=" << plan.weights_in_shared
      << " shared=" << plan.shared_bytes << " coefficient_shared=" << plan.coefficient_shared_bytes
      << " coefficient_chunks=" << plan.coefficient_chunks << " utilisation=" << std::setprecision(12)
      << cinc::cuda::hot_loop_utilisation<T>(p.H, p.W, p.groups_per_block, plan.threads, p.k, p.padded_channels);
  return out.str();
}

template <typename T, bool kAdjoint, bool kRingShared, bool kWeightsShared, bool kCluster>
void launch_wavefront(const cinc::cuda::WavefrontPlan& plan, const cinc::cuda::WavefrontParams<T>& p, int64_t B,
                      const Device& device) {
  using namespace cinc::cuda;
  const dim3 grid(static_cast<unsigned int>(B * plan.blocks_per_image)), block(plan.threads);
  cuda_emulation::launch_cluster(wavefront_kernel<T, kAdjoint, kRingShared, kWeightsShared, kCluster>, grid, block,
                                 kCluster ? plan.blocks_per_image : 1, static_cast<size_t>(plan.shared_bytes),
                                 kWavefrontMaxThreads<T>, device, p);
}

// The specialisation cinc_cuda_wavefront.cu launches for a plan.
template <typename T, bool kAdjoint>
void dispatch_wavefront(const cinc::cuda::WavefrontPlan& plan, const cinc::cuda::WavefrontParams<T>& p, int64_t B,
                        const Device& device) {
  if (plan.blocks_per_image > 1) {
    plan.weights_in_shared ? launch_wavefront<T, kAdjoint, true, true, true>(plan, p, B, device)
                           : launch_wavefront<T, kAdjoint, true, false, true>(plan, p, B, device);
  } else if (!plan.ring_in_shared) {
    launch_wavefront<T, kAdjoint, false, false, false>(plan, p, B, device);
  } else {
    plan.weights_in_shared ? launch_wavefront<T, kAdjoint, true, true, false>(plan, p, B, device)
                           : launch_wavefront<T, kAdjoint, true, false, false>(plan, p, B, device);
  }
}

template <typename T>
void run_wavefront(const Problem& pr, bool adjoint, int forced_threads, int forced_blocks, int multiprocessors,
                   int coefficient_threads, const std::vector<double>& weight, const std::vector<double>& bias,
                   const std::vector<double>& input) {
  using namespace cinc::cuda;
  const std::vector<T> w = cast<T>(weight), b = cast<T>(bias), rhs = cast<T>(input);
  std::vector<T> out(pr.B * pr.C * pr.H * pr.W, T(NAN));
  WavefrontParams<T> p{};
  p.rhs = rhs.data() + pr.offset;
  p.rhs_stride_b = pr.strides[0];
  p.rhs_stride_c = pr.strides[1];
  p.rhs_stride_h = pr.strides[2];
  p.rhs_stride_w = pr.strides[3];
  p.bias = pr.has_bias ? b.data() : nullptr;
  p.out = out.data();
  p.C = pr.C;
  p.H = pr.H;
  p.W = pr.W;
  p.k = pr.k;
  const WavefrontPlan plan =
      plan_wavefront(p, pr.plan_batch, wavefront_device(pr, multiprocessors), forced_threads, forced_blocks);
  if (!plan.fits) throw LaunchError("layout: L, L⁻¹ or one diagonal's partial sums do not fit in shared memory");
  // The workspaces, NaN-filled like shared memory: what the kernels read before writing shows up.
  std::vector<T> coefficients(plan.coefficient_elements, T(NAN));
  std::vector<T> rings(plan.ring_global_elements * pr.B, T(NAN));
  p.coefficients = coefficients.data();
  p.ring_global = rings.data();
  const dim3 coefficient_grid(static_cast<unsigned int>(pr.k * pr.k), static_cast<unsigned int>(plan.coefficient_chunks));
  const size_t coefficient_shared = static_cast<size_t>(plan.coefficient_shared_bytes);
  if (adjoint) {
    launch(wavefront_coefficients_kernel<T, true>, coefficient_grid, dim3(coefficient_threads), coefficient_shared,
           kCoefficientThreads, pr.device, w.data(), pr.C, pr.k, pr.unit_diagonal, p.padded_channels,
           coefficients.data());
  } else {
    launch(wavefront_coefficients_kernel<T, false>, coefficient_grid, dim3(coefficient_threads), coefficient_shared,
           kCoefficientThreads, pr.device, w.data(), pr.C, pr.k, pr.unit_diagonal, p.padded_channels,
           coefficients.data());
  }
  if (pr.B > 0) {
    adjoint ? dispatch_wavefront<T, true>(plan, p, pr.B, pr.device)
            : dispatch_wavefront<T, false>(plan, p, pr.B, pr.device);
  }
  write_output(plan_text<T>(plan, p), out);
}

template <typename T>
void run_logdet(const Problem& pr, const std::vector<double>& weight) {
  using namespace cinc::cuda;
  const std::vector<T> w = cast<T>(weight);
  std::vector<T> out(1, T(NAN));
  launch(logdet_kernel<T>, dim3(1), dim3(kLogdetThreads), kLogdetSharedBytes, kLogdetThreads, pr.device, w.data(),
         pr.C, pr.k, static_cast<double>(pr.H) * static_cast<double>(pr.W), out.data());
  write_output("threads=" + std::to_string(kLogdetThreads), out);
}

template <typename T>
void print_plan(const Problem& pr, int forced_threads, int forced_blocks, int multiprocessors) {
  cinc::cuda::WavefrontParams<T> p{};
  p.C = pr.C;
  p.H = pr.H;
  p.W = pr.W;
  p.k = pr.k;
  const cinc::cuda::WavefrontPlan plan =
      cinc::cuda::plan_wavefront(p, pr.plan_batch, wavefront_device(pr, multiprocessors), forced_threads,
                                 forced_blocks);
  std::printf("%s groups_per_block=%d ring_stride=%d partial_elements=%lld ring_elements=%lld "
              "weight_elements=%lld\n",
              plan_text<T>(plan, p).c_str(), p.groups_per_block, p.ring_stride,
              static_cast<long long>(p.partial_elements), static_cast<long long>(p.ring_elements),
              static_cast<long long>(p.weight_elements));
}

// The counters of the last launch (the wavefront kernel's) as JSON: one object per phase of each block.
void write_counters(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "run_kernels: cannot write %s\n", path.c_str());
    std::exit(2);
  }
  const auto& phases = cuda_emulation::counters().phases;
  std::fprintf(f, "[\n");
  for (size_t n = 0; n < phases.size(); ++n) {
    const auto& ph = phases[n];
    std::fprintf(f, " {\"block\": %d, \"end\": \"%s\", \"threads\": %u, \"sites\": [", ph.block, ph.end.c_str(),
                 ph.threads);
    bool first = true;
    for (const auto& [key, c] : ph.sites) {
      std::fprintf(f,
                   "%s\n  {\"site\": \"%s:%u\", \"store\": %s, \"remote\": %s, \"bytes\": %llu, \"accesses\": %llu, "
                   "\"max_per_thread\": %llu, \"active_threads\": %llu, \"warp_accesses\": %llu, "
                   "\"wavefronts\": %llu, \"ideal\": %llu, \"worst\": %.4f}",
                   first ? "" : ",", key.file.c_str(), key.line, key.store ? "true" : "false",
                   c.remote ? "true" : "false", static_cast<unsigned long long>(c.bytes),
                   static_cast<unsigned long long>(c.accesses), static_cast<unsigned long long>(c.max_per_thread),
                   static_cast<unsigned long long>(c.active_threads), static_cast<unsigned long long>(c.warp_accesses),
                   static_cast<unsigned long long>(c.wavefronts), static_cast<unsigned long long>(c.ideal), c.worst);
      first = false;
    }
    std::fprintf(f, "]}%s\n", n + 1 < phases.size() ? "," : "");
  }
  std::fprintf(f, "]\n");
  std::fclose(f);
}

// A small deterministic generator: the math check needs no input.
double uniform(uint64_t& state) {
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<double>(state >> 11) / static_cast<double>(1ULL << 53) * 2.0 - 1.0;
}

template <typename T>
bool check_block_substitutions(int64_t C, uint64_t seed) {
  constexpr int P = 8;
  std::vector<T> weight(C * C);  // k = 1: the centre tap is the whole weight
  for (auto& v : weight) v = static_cast<T>(uniform(seed) * 0.3);
  for (int64_t c = 0; c < C; ++c) weight[c * C + c] = static_cast<T>(2.0 + uniform(seed) * 0.5);
  bool ok = true;
  for (const bool upper : {false, true}) {
    std::vector<T> columns(C * C);
    cinc::centre_tap_columns(weight.data(), C, 1, false, upper, columns.data());
    std::vector<T> block(C * P), single(C * P);
    for (auto& v : block) v = static_cast<T>(uniform(seed));
    for (int p = 0; p < P; ++p) {
      std::vector<T> r(C);
      for (int64_t c = 0; c < C; ++c) r[c] = block[c * P + p];
      if (upper) {
        cinc::solve_upper_in_place(columns.data(), r.data(), C);
      } else {
        cinc::solve_lower_in_place(columns.data(), r.data(), C);
      }
      for (int64_t c = 0; c < C; ++c) single[c * P + p] = r[c];
    }
    if (upper) {
      cinc::solve_upper_in_place_block<P>(columns.data(), block.data(), C);
    } else {
      cinc::solve_lower_in_place_block<P>(columns.data(), block.data(), C);
    }
    if (std::memcmp(block.data(), single.data(), sizeof(T) * block.size()) != 0) {
      std::fprintf(stderr, "math: solve_%s_in_place_block differs from solve_%s_in_place (C = %" PRId64 ")\n",
                   upper ? "upper" : "lower", upper ? "upper" : "lower", C);
      ok = false;
    }
  }
  return ok;
}

int run(int argc, char** argv) {
  if (argc < 2 || (argc < 3 && std::string(argv[1]) != "math")) {
    std::fprintf(stderr, "usage: run_kernels OP DTYPE key=value... | run_kernels math\n");
    return 2;
  }
  const std::string op = argv[1], dtype = argc > 2 ? argv[2] : "";
  Args args;
  for (int a = 3; a < argc; ++a) {
    const std::string kv = argv[a];
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "run_kernels: %s is not key=value\n", argv[a]);
      return 2;
    }
    args.values[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  if (op == "selftest") {
    const Device device;
    if (dtype == "guard") {
      launch(cinc::cuda::write_past_shared_memory, dim3(1), dim3(32), 64, 32, device, 64);
    } else if (dtype == "cluster" || dtype == "cluster_race") {
      std::vector<int> out(32);
      cuda_emulation::launch_cluster(cinc::cuda::push_to_peer, dim3(2), dim3(32), 2, 32 * sizeof(int), 32, device,
                                     out.data(), dtype == "cluster");
      for (const int v : out) std::printf("%d ", v);
      std::printf("\n");
      return 0;
    } else {
      std::vector<int> out(32);
      launch(cinc::cuda::read_without_barrier, dim3(1), dim3(32), 32 * sizeof(int), 32, device, out.data());
    }
    std::printf("no error\n");
    return 0;
  }
  if (op == "math") {
    bool ok = true;
    for (const int64_t C : {1, 2, 3, 7, 17}) {
      ok &= check_block_substitutions<float>(C, 1000 + C);
      ok &= check_block_substitutions<double>(C, 2000 + C);
    }
    std::printf(ok ? "ok\n" : "failed\n");
    return ok ? 0 : 1;
  }
  Problem pr;
  pr.B = args.get("B", 1);
  pr.C = args.get("C", 1);
  pr.H = args.get("H", 1);
  pr.W = args.get("W", 1);
  pr.k = static_cast<int>(args.get("k", 1));
  pr.unit_diagonal = args.get("unit", 0) != 0;
  pr.has_bias = args.get("bias", 0) != 0;
  pr.device.shared_bytes_per_block = static_cast<size_t>(args.get("shared", 232448));
  pr.device.max_cluster = static_cast<int>(args.get("cluster", 8));
  pr.shared_per_multiprocessor = args.get("shared_sm", 233472);
  pr.plan_batch = args.get("plan_batch", pr.B);
  const int threads = static_cast<int>(args.get("threads", 0)), blocks = static_cast<int>(args.get("blocks", 0));
  const int sms = static_cast<int>(args.get("sms", 132));
  if (op == "plan") {
    dtype == "float" ? print_plan<float>(pr, threads, blocks, sms) : print_plan<double>(pr, threads, blocks, sms);
    return 0;
  }
  const std::vector<double> weight = read_doubles(pr.C * pr.C * pr.k * pr.k);
  const std::vector<double> bias = read_doubles(pr.has_bias ? pr.C : 0);
  if (op == "logdet") {
    dtype == "float" ? run_logdet<float>(pr, weight) : run_logdet<double>(pr, weight);
    return 0;
  }
  pr.strides = args.list("strides");
  pr.offset = args.get("offset", 0);
  pr.storage = args.get("storage", 0);
  const std::vector<double> input = read_doubles(pr.storage);
  if (op == "forward") {
    // The accumulator types of cinc_cuda_forward.cu (at::opmath_type).
    if (dtype == "half") {
      run_forward<c10::Half, float>(pr, weight, bias, input);
    } else if (dtype == "bfloat16") {
      run_forward<c10::BFloat16, float>(pr, weight, bias, input);
    } else if (dtype == "float") {
      run_forward<float, float>(pr, weight, bias, input);
    } else {
      run_forward<double, double>(pr, weight, bias, input);
    }
  } else if (op == "inverse" || op == "inverse_transpose") {
    const bool adjoint = op == "inverse_transpose";
    const int coefficient_threads = static_cast<int>(args.get("coefficient_threads", cinc::cuda::kCoefficientThreads));
    const auto counters = args.values.find("counters");
    cuda_emulation::set_counting(counters != args.values.end());
    dtype == "float"
        ? run_wavefront<float>(pr, adjoint, threads, blocks, sms, coefficient_threads, weight, bias, input)
        : run_wavefront<double>(pr, adjoint, threads, blocks, sms, coefficient_threads, weight, bias, input);
    if (counters != args.values.end()) write_counters(counters->second);
  } else {
    std::fprintf(stderr, "run_kernels: unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const LaunchError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  }
}
