// Quantized matmuls on the CPU: one XLA FFI handler, built and registered by pallas_kernels/native_cpu.py.
//
//   y_i [M, N_i] = x [M, K] @ W_i, W_i[k, n] = (values_i[n, k] - zero) * scales_i[k / g, n]
//
// for one or several weights of one scheme (pallas_kernels/quantized_matmul/reference.py has the
// format): int8 values, or int4 packed two a byte (XLA hands an S4 buffer over packed, element 2i in
// the low nibble of byte i), scales and zero points [K / g, N] float32 laid out output-major (the custom
// call asks XLA for that layout, cpu.py): each output's groups are one contiguous run, read as a stream
// beside its values. Input-major, a tile read one float from each group's row, N floats apart, a pattern
// the hardware prefetcher does not follow; the model's matmuls took 10-15% longer through XLA
// (docs/benchmarks.md). The engine keeps these parameters in that layout on the CPU
// (params.kernel_layouts), so XLA has nothing to transpose at each step.
//
// The scale and zero point come out of each group's sum: a group contributes
// scale * sum(level x) - zero * scale * sum(x). The signed levels are widened to float32 in registers and
// meet x in FMAs, and sum(x) is taken once per group and row of x (only with zero points, where it is
// the format's own); so the result is the reference's to float rounding: the issue asks kernels to be exact
// to float tolerance, as the TPU and GPU ones are, and greedy text should not depend on the platform.
// Dequantizing each weight first ((level - zero) * scale, as the reference writes it) costs one more
// FMA a weight and a dependency through it: the default model's int8 head ran at half this speed.
// llama.cpp instead quantizes x to int8 per block and takes integer dot products (maddubs); on this
// project's 2-core AMD EPYC (AVX2, no VNNI) a version of this kernel doing that was 1.3 to 1.5 times
// faster per weight, but moved every output by up to ~0.5% of its size (docs/benchmarks.md).
//
// A tile is one output (one weight row, read as one stream: several rows at once, strided, ran slower)
// for up to four rows of x, which share each block's widening.
//
// Work is split over outputs, in chunks taken from an atomic counter by the calling thread and by
// tasks on XLA's intra-op thread pool (any thread count, including none, gives the same result:
// each output is computed whole by one thread in one order).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QMM_AVX2 1
#else
#define QMM_AVX2 0
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // weights widened at a time; every group is whole blocks
constexpr int64_t kRowTile = 4;  // rows of x that share one widening of a weight block

// x [M, K] as the tiles read it: float32 with each block of 32 reordered, for int4, to the order its
// nibbles unpack in (the block's even elements, then its odd ones); and each group's sum.
struct PreparedX {
  int64_t m, k, groups;
  std::vector<float> f;
  std::vector<float> sums;  // [M, K / g]
};

void PrepareX(const float* x, int64_t m, int64_t k, int64_t group, bool deinterleave, PreparedX& out) {
  out.m = m;
  out.k = k;
  out.groups = k / group;
  out.f.resize(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < k; b += kBlock)
      for (int64_t i = 0; i < kBlock; ++i) {
        const int64_t at = deinterleave ? (i % 2) * (kBlock / 2) + i / 2 : i;
        out.f[r * k + b + at] = x[r * k + b + i];
      }
  out.sums.assign(m * out.groups, 0.0f);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < out.groups; ++j)
      for (int64_t i = j * group; i < (j + 1) * group; ++i) out.sums[r * out.groups + j] += x[r * k + i];
}

struct Weight {
  const uint8_t* values;  // [N, K] int8, or [N, K / 2] bytes of packed int4
  const float* scales;    // [K / g, N], laid out output-major: output n's groups in a row
  const float* zeros;     // the same, or null
  float* y;               // [M, N]
  int64_t n;
};

struct Problem {
  const PreparedX* x;
  int64_t group;
  bool int4;
  std::vector<Weight> weights;
};

#if QMM_AVX2

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Output n times rows [r0, r0 + kRows) of x. Each row's sum runs in the same order whatever kRows is
// (two partial sums a group, then the groups in order), so any tiling gives the same bits.
template <bool kInt4, int kRows>
void TileAvx2(const Problem& p, const Weight& w, int64_t n, int64_t r0) {
  const PreparedX& x = *p.x;
  const int64_t k = x.k, per_group = p.group / kBlock;
  const uint8_t* row = w.values + n * (kInt4 ? k / 2 : k);
  const __m128i high4 = _mm_set1_epi8(static_cast<char>(0xF0));
  __m256 acc[kRows];
  float base_sum[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps(), base_sum[r] = 0.0f;
  for (int64_t j = 0; j < x.groups; ++j) {
    __m256 g[kRows][2];
    for (int r = 0; r < kRows; ++r) g[r][0] = g[r][1] = _mm256_setzero_ps();
    for (int64_t b = j * per_group; b < (j + 1) * per_group; ++b) {
      __m256 u[4];
      if constexpr (kInt4) {
        // 16 bytes, 32 levels: each nibble moved to the top of its byte reads as a signed byte of 16 *
        // level (the 1/16 goes into the scale, exactly); the low nibbles are the block's even elements,
        // the high ones its odd (x is reordered to match).
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
        const __m128i lo = _mm_and_si128(_mm_slli_epi16(packed, 4), high4);
        const __m128i hi = _mm_and_si128(packed, high4);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; ++i) u[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i]));
      } else {
        for (int i = 0; i < 4; ++i)
          u[i] = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * kBlock + 8 * i))));
      }
      for (int r = 0; r < kRows; ++r) {
        const float* xb = x.f.data() + (r0 + r) * k + b * kBlock;
        for (int i = 0; i < 4; ++i) g[r][i & 1] = _mm256_fmadd_ps(u[i], _mm256_loadu_ps(xb + 8 * i), g[r][i & 1]);
      }
    }
    const float s = w.scales[n * x.groups + j];
    const float base = w.zeros ? -w.zeros[n * x.groups + j] * s : 0.0f;
    const __m256 scale = _mm256_set1_ps(kInt4 ? s * 0.0625f : s);
    for (int r = 0; r < kRows; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_add_ps(g[r][0], g[r][1]), scale, acc[r]);
      if (w.zeros) base_sum[r] += base * x.sums[(r0 + r) * x.groups + j];
    }
  }
  for (int r = 0; r < kRows; ++r) w.y[(r0 + r) * w.n + n] = HorizontalSum(acc[r]) + base_sum[r];
}

template <bool kInt4>
void ChunkAvx2(const Problem& p, const Weight& w, int64_t n0, int64_t n1) {
  const int64_t m = p.x->m;
  for (int64_t r0 = 0; r0 < m; r0 += kRowTile)
    for (int64_t n = n0; n < n1; ++n) switch (std::min(kRowTile, m - r0)) {
        case 1: TileAvx2<kInt4, 1>(p, w, n, r0); break;
        case 2: TileAvx2<kInt4, 2>(p, w, n, r0); break;
        case 3: TileAvx2<kInt4, 3>(p, w, n, r0); break;
        default: TileAvx2<kInt4, 4>(p, w, n, r0); break;
      }
}

#endif  // QMM_AVX2

// The portable path: the same arithmetic, one lane, x in its own order.
void OutputScalar(const Problem& p, const Weight& w, int64_t n, int64_t r0, int64_t rows) {
  const PreparedX& x = *p.x;
  const int64_t k = x.k;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float acc = 0.0f, base_sum = 0.0f;
    for (int64_t j = 0; j < x.groups; ++j) {
      float g = 0.0f;
      for (int64_t kk = j * p.group; kk < (j + 1) * p.group; ++kk) {
        float u;
        if (p.int4) {
          const uint8_t byte = w.values[n * (k / 2) + kk / 2];
          u = static_cast<float>(((((kk % 2) ? byte >> 4 : byte) & 0x0F) ^ 0x08) - 8);  // the signed nibble
        } else {
          u = static_cast<float>(static_cast<int8_t>(w.values[n * k + kk]));
        }
        g = std::fma(u, x.f[r * k + kk], g);
      }
      const float s = w.scales[n * x.groups + j];
      acc = std::fma(g, s, acc);
      if (w.zeros) base_sum += -w.zeros[n * x.groups + j] * s * x.sums[r * x.groups + j];
    }
    w.y[r * w.n + n] = acc + base_sum;
  }
}

// Outputs [n0, n1) of one weight, every row of x.
void RunChunk(const Problem& p, const Weight& w, int64_t n0, int64_t n1) {
#if QMM_AVX2
  if (p.int4)
    ChunkAvx2<true>(p, w, n0, n1);
  else
    ChunkAvx2<false>(p, w, n0, n1);
#else
  const int64_t m = p.x->m;
  for (int64_t n = n0; n < n1; ++n) OutputScalar(p, w, n, 0, m);
#endif
}

// Chunks of outputs over all the weights, taken by whichever thread asks next.
struct Work {
  std::vector<std::pair<int, int64_t>> chunks;  // (weight, first output)
  int64_t chunk;
  const Problem* problem;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    const int64_t total = static_cast<int64_t>(chunks.size());
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      const auto [i, n0] = chunks[c];
      const Weight& w = problem->weights[i];
      RunChunk(*problem, w, n0, std::min(n0 + chunk, w.n));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void Run(const Problem& p, ffi::ThreadPool& pool) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t outputs = 0;
  for (const Weight& w : p.weights) outputs += w.n;
  // About four chunks a thread (even shares when threads stall), whole multiples of 8 outputs.
  auto work = std::make_shared<Work>();
  work->chunk = (std::max<int64_t>(8, (outputs + 4 * threads - 1) / (4 * threads)) + 7) / 8 * 8;
  for (int i = 0; i < static_cast<int>(p.weights.size()); ++i)
    for (int64_t n0 = 0; n0 < p.weights[i].n; n0 += work->chunk) work->chunks.emplace_back(i, n0);
  work->problem = &p;
  const int64_t total = static_cast<int64_t>(work->chunks.size());
  const int64_t helpers = std::min(threads, total) - 1;
  // A helper that starts after the work is gone finds no chunk and touches nothing but `work`,
  // which it keeps alive; the caller waits only for chunks that were taken, by running threads.
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  for (int spins = 0; work->done.load(std::memory_order_acquire) < total; ++spins) {
    if (spins < 4096) {
#if QMM_AVX2
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

ffi::Error QuantizedMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets,
                           int64_t group, bool int4, bool zero_points) {
  if (x.element_type() != ffi::F32 || x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("x must be float32 [M, K]");
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  if (group <= 0 || group % kBlock || k % group)
    return ffi::Error::InvalidArgument("the group must be whole blocks of 32 and divide K");
  const size_t per_weight = zero_points ? 3 : 2;
  if (args.size() % per_weight || args.size() / per_weight != rets.size())
    return ffi::Error::InvalidArgument("expected (values, scales[, zeros]) per output");
  Problem p;
  p.group = group;
  p.int4 = int4;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto values = args.get<ffi::AnyBuffer>(per_weight * i);
    auto scales = args.get<ffi::AnyBuffer>(per_weight * i + 1);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (!values.has_value() || !scales.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("could not read a weight's buffers");
    const auto expect = int4 ? ffi::S4 : ffi::S8;
    if (values->element_type() != expect || values->dimensions().size() != 2 || values->dimensions()[1] != k)
      return ffi::Error::InvalidArgument("values must be [N, K] int8 or int4");
    const int64_t n = values->dimensions()[0];
    if (scales->element_type() != ffi::F32 || scales->element_count() != static_cast<size_t>((k / group) * n))
      return ffi::Error::InvalidArgument("scales must be float32 [K / g, N]");
    Weight w{static_cast<const uint8_t*>(values->untyped_data()), scales->typed_data<float>(), nullptr,
             static_cast<float*>((*y)->untyped_data()), n};
    if (zero_points) {
      auto zeros = args.get<ffi::AnyBuffer>(per_weight * i + 2);
      if (!zeros.has_value() || zeros->element_type() != ffi::F32 || zeros->element_count() != scales->element_count())
        return ffi::Error::InvalidArgument("zeros must be float32 [K / g, N]");
      w.zeros = zeros->typed_data<float>();
    }
    if ((*y)->element_type() != ffi::F32 || (*y)->element_count() != static_cast<size_t>(m * n))
      return ffi::Error::InvalidArgument("each output must be float32 [M, N]");
    p.weights.push_back(w);
  }
  PreparedX qx;
  PrepareX(x.typed_data<float>(), m, k, group, int4 && QMM_AVX2, qx);
  p.x = &qx;
  Run(p, pool);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_quantized_matmul, QuantizedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("int4")
                                  .Attr<bool>("zero_points"));

// 1 where the handler was built with AVX2 and FMA, 0 for the portable path (native_cpu.py reports it).
extern "C" int jaxinfer_quantized_matmul_avx2() { return QMM_AVX2; }
