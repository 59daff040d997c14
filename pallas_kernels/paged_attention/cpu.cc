// Paged attention for decode rows on the CPU: one XLA FFI handler, built and registered by
// pallas_kernels/native_cpu.py.
//
//   out [D, H, Dh] = softmax(q k^T * sm_scale) v, row d over its sequence's keys in the pages
//
// Row d's query sits at position positions[d] and sees keys 0 .. min(kv_lens[d], positions[d] + 1),
// from positions[d] - sliding_window + 1 on where there is a window; scores pass through
// soft_cap * tanh(s / soft_cap) where there is a cap. The GQA group rides in the heads: query head h
// reads KV head h / (H / K). A row that sees no key comes out zero. This is what
// jaxinfer/layers/attention_xla.py computes for the decode region; XLA's CPU backend ran that as
// gathers of whole key blocks and small einsums, 10 ms a step over the default model's 30 layers at a
// 100-token context and 38 ms at 1,000 (docs/benchmarks.md), for what is a few megaflops.
//
// Keys are read where they lie, through the page table (a page id outside the cache is clamped, as
// XLA's gather clamps). Scores are taken in one pass, then the softmax, then the weighted values:
// float32 throughout (AVX2 where built with it), the same order for any row count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float Widen(float v) { return v; }
inline float Widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {  // bf16 is the top half of a float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// q . k over dh elements.
template <typename KV>
float Dot(const float* q, const KV* k, int64_t dh) {
  int64_t j = 0;
  float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= dh; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), Load8(k + j), acc);
  sum = HorizontalSum(acc);
#endif
  for (; j < dh; ++j) sum += q[j] * Widen(k[j]);
  return sum;
}

// o += p * v over dh elements.
template <typename KV>
void AddScaled(float* o, float p, const KV* v, int64_t dh) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 pv = _mm256_set1_ps(p);
  for (; j + 8 <= dh; j += 8) _mm256_storeu_ps(o + j, _mm256_fmadd_ps(pv, Load8(v + j), _mm256_loadu_ps(o + j)));
#endif
  for (; j < dh; ++j) o[j] += p * Widen(v[j]);
}

// Each KV head's keys and values are read once for its whole group of query heads (GQA): the group's
// scores for a key are taken together, and each value row is added to every head of the group.
template <typename KV>
void Attend(const float* q, const KV* k_pages, const KV* v_pages, const int32_t* kv_lens, const int32_t* page_table,
            const int32_t* positions, float* out, int64_t rows, int64_t heads, int64_t dh, int64_t num_pages,
            int64_t page_size, int64_t kv_heads, int64_t table_width, float sm_scale, int64_t window, float soft_cap) {
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * dh, page_stride = page_size * token_stride;
  std::vector<float> scores, top(group), total(group);
  std::vector<int64_t> token_at;  // offset of each key's token in the pages
  for (int64_t d = 0; d < rows; ++d) {
    float* row_out = out + d * heads * dh;
    std::fill(row_out, row_out + heads * dh, 0.0f);
    const int64_t end = std::min<int64_t>(kv_lens[d], static_cast<int64_t>(positions[d]) + 1);
    const int64_t begin = window > 0 ? std::max<int64_t>(0, positions[d] - window + 1) : 0;
    const int64_t n = end - begin;
    if (n <= 0) continue;
    token_at.resize(n);
    scores.resize(group * n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = begin + i;
      const int64_t slot = std::min<int64_t>(t / page_size, table_width - 1);
      const int64_t page = std::clamp<int64_t>(page_table[d * table_width + slot], 0, num_pages - 1);
      token_at[i] = page * page_stride + (t % page_size) * token_stride;
    }
    for (int64_t kv_head = 0; kv_head < kv_heads; ++kv_head) {
      const float* qg = q + (d * heads + kv_head * group) * dh;
      float* og = row_out + kv_head * group * dh;
      std::fill(top.begin(), top.end(), -INFINITY);
      for (int64_t i = 0; i < n; ++i) {
        const KV* k = k_pages + token_at[i] + kv_head * dh;
        for (int64_t r = 0; r < group; ++r) {
          float s = Dot(qg + r * dh, k, dh) * sm_scale;
          if (soft_cap > 0.0f) s = soft_cap * std::tanh(s / soft_cap);
          scores[r * n + i] = s;
          top[r] = std::max(top[r], s);
        }
      }
      for (int64_t r = 0; r < group; ++r) {
        float sum = 0.0f;
        for (int64_t i = 0; i < n; ++i) sum += (scores[r * n + i] = std::exp(scores[r * n + i] - top[r]));
        total[r] = sum;
      }
      for (int64_t i = 0; i < n; ++i) {
        const KV* v = v_pages + token_at[i] + kv_head * dh;
        for (int64_t r = 0; r < group; ++r) AddScaled(og + r * dh, scores[r * n + i], v, dh);
      }
      for (int64_t r = 0; r < group; ++r) {
        const float inv = 1.0f / total[r];
        for (int64_t j = 0; j < dh; ++j) og[r * dh + j] *= inv;
      }
    }
  }
}

ffi::Error PagedAttentionDecode(ffi::AnyBuffer q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                                ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_table,
                                ffi::Buffer<ffi::S32> positions, ffi::Result<ffi::AnyBuffer> out, float sm_scale,
                                int64_t sliding_window, float soft_cap) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (q.element_type() != ffi::F32 || qd.size() != 3)
    return ffi::Error::InvalidArgument("q must be float32 [D, H, Dh]");
  if (kd.size() != 4 || k_pages.element_type() != v_pages.element_type() ||
      v_pages.element_count() != k_pages.element_count() ||
      (k_pages.element_type() != ffi::F32 && k_pages.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("k and v pages must be float32 or bf16 [N, page_size, K, Dh], alike");
  const int64_t rows = qd[0], heads = qd[1], dh = qd[2], kv_heads = kd[2];
  if (kd[3] != dh || kv_heads <= 0 || heads % kv_heads)
    return ffi::Error::InvalidArgument("the heads of q and the pages do not match");
  if (td.size() != 2 || td[0] < rows || td[1] < 1 || kv_lens.element_count() < static_cast<size_t>(rows) ||
      positions.element_count() < static_cast<size_t>(rows))
    return ffi::Error::InvalidArgument("page_table [>= D, P], kv_lens and positions [>= D] expected");
  if (out->element_type() != ffi::F32 || out->element_count() != q.element_count())
    return ffi::Error::InvalidArgument("out must be float32 like q");
  auto run = [&](auto* kv) {
    using KV = std::remove_const_t<std::remove_pointer_t<decltype(kv)>>;
    Attend<KV>(q.typed_data<float>(), static_cast<const KV*>(k_pages.untyped_data()),
               static_cast<const KV*>(v_pages.untyped_data()), kv_lens.typed_data(), page_table.typed_data(),
               positions.typed_data(), static_cast<float*>(out->untyped_data()), rows, heads, dh, kd[0], kd[1],
               kv_heads, td[1], sm_scale, sliding_window, soft_cap);
  };
  if (k_pages.element_type() == ffi::F32)
    run(static_cast<const float*>(nullptr));
  else
    run(static_cast<const uint16_t*>(nullptr));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_attention_decode, PagedAttentionDecode,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
