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
// Each block of 32 weights is widened and dequantized in registers ((level - zero) * scale, as the
// reference's dequantize) and meets x in float32 FMAs, so the result is the reference's to float
// rounding: the issue asks kernels to be exact to float tolerance, as the TPU and GPU ones are, and
// greedy text should not depend on the platform. llama.cpp instead quantizes x to int8 per block and
// takes integer dot products (maddubs); on this project's 2-core AMD EPYC (AVX2, no VNNI) a version
// of this kernel doing that was 1.3 to 1.5 times faster per weight, but moved every output by up to
// ~0.5% of its size (docs/benchmarks.md).
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
constexpr int64_t kRowTile = 4;  // rows of x that share one unpacking of a weight block

// x [M, K] as the tiles read it: float32 with each block of 32 reordered, for int4, to the order its
// nibbles unpack in (the block's even elements, then its odd ones).
struct PreparedX {
  int64_t m, k, groups;
  std::vector<float> f;
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

// Outputs [n, n + kOuts) times rows [r0, r0 + kRows) of x: kRows * kOuts accumulators, each weight
// block widened and dequantized once for all rows, each x block read once for all outputs.
template <bool kInt4, int kRows, int kOuts>
void TileAvx2(const Problem& p, const Weight& w, int64_t n, int64_t r0) {
  const PreparedX& x = *p.x;
  const int64_t k = x.k, per_group = p.group / kBlock;
  const int64_t row_bytes = kInt4 ? k / 2 : k;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x88));
  __m256 acc[kRows][kOuts];
  for (int r = 0; r < kRows; ++r)
    for (int o = 0; o < kOuts; ++o) acc[r][o] = _mm256_setzero_ps();
  for (int64_t j = 0; j < x.groups; ++j) {
    // W = (level - zero) * scale = u * scale + base: u the level (int4: level + 8), base -(zero (+ 8)) * scale.
    __m256 scale[kOuts], base[kOuts];
    for (int o = 0; o < kOuts; ++o) {
      const float s = w.scales[(n + o) * x.groups + j];
      scale[o] = _mm256_set1_ps(s);
      const float zero = w.zeros ? w.zeros[(n + o) * x.groups + j] : 0.0f;
      base[o] = _mm256_set1_ps(-(zero + (kInt4 ? 8.0f : 0.0f)) * s);
    }
    for (int64_t b = j * per_group; b < (j + 1) * per_group; ++b) {
      for (int o = 0; o < kOuts; ++o) {
        const uint8_t* at = w.values + (n + o) * row_bytes;
        __m256 wf[4];
        if constexpr (kInt4) {
          // 16 bytes, 32 levels: flipping each nibble's sign bit gives level + 8 (0..15); the low
          // nibbles are the block's even elements, the high ones its odd (x is reordered to match).
          const __m128i packed = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at + b * 16)), flip);
          const __m128i lo = _mm_and_si128(packed, low4);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low4);
          const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
          for (int i = 0; i < 4; ++i)
            wf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), scale[o], base[o]);
        } else {
          for (int i = 0; i < 4; ++i) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at + b * kBlock + 8 * i));
            wf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale[o], base[o]);
          }
        }
        for (int r = 0; r < kRows; ++r) {
          const float* xb = x.f.data() + (r0 + r) * k + b * kBlock;
          for (int i = 0; i < 4; ++i) acc[r][o] = _mm256_fmadd_ps(wf[i], _mm256_loadu_ps(xb + 8 * i), acc[r][o]);
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int o = 0; o < kOuts; ++o) w.y[(r0 + r) * w.n + n + o] = HorizontalSum(acc[r][o]);
}

template <bool kInt4, int kOuts>
void TileRowsAvx2(const Problem& p, const Weight& w, int64_t n, int64_t r0, int64_t rows) {
  switch (rows) {
    case 1: TileAvx2<kInt4, 1, kOuts>(p, w, n, r0); break;
    case 2: TileAvx2<kInt4, 2, kOuts>(p, w, n, r0); break;
    case 3: TileAvx2<kInt4, 3, kOuts>(p, w, n, r0); break;
    default: TileAvx2<kInt4, 4, kOuts>(p, w, n, r0); break;
  }
}

template <bool kInt4>
void ChunkAvx2(const Problem& p, const Weight& w, int64_t n0, int64_t n1) {
  const int64_t m = p.x->m;
  for (int64_t r0 = 0; r0 < m; r0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, m - r0);
    int64_t n = n0;
    // Four outputs a tile for one row, two for two, one for more: at most eight accumulator pairs
    // (a group's and the total) in the sixteen vector registers.
    if (rows == 1)
      for (; n + 4 <= n1; n += 4) TileRowsAvx2<kInt4, 4>(p, w, n, r0, rows);
    else if (rows == 2)
      for (; n + 2 <= n1; n += 2) TileRowsAvx2<kInt4, 2>(p, w, n, r0, rows);
    for (; n < n1; ++n) TileRowsAvx2<kInt4, 1>(p, w, n, r0, rows);
  }
}

#endif  // QMM_AVX2

// The portable path: the same arithmetic, one lane, x in its own order.
void OutputScalar(const Problem& p, const Weight& w, int64_t n, int64_t r0, int64_t rows) {
  const PreparedX& x = *p.x;
  const int64_t k = x.k;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    float acc = 0.0f;
    for (int64_t j = 0; j < x.groups; ++j) {
      const float s = w.scales[n * x.groups + j];
      const float base = -((w.zeros ? w.zeros[n * x.groups + j] : 0.0f) + (p.int4 ? 8.0f : 0.0f)) * s;
      for (int64_t kk = j * p.group; kk < (j + 1) * p.group; ++kk) {
        float level;
        if (p.int4) {
          const uint8_t byte = w.values[n * (k / 2) + kk / 2];
          level = static_cast<float>((((kk % 2) ? byte >> 4 : byte) & 0x0F) ^ 0x08);  // level + 8
        } else {
          level = static_cast<float>(static_cast<int8_t>(w.values[n * k + kk]));
        }
        acc = std::fma(std::fma(level, s, base), x.f[r * k + kk], acc);
      }
    }
    w.y[r * w.n + n] = acc;
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
