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
// float32 throughout, the same order for any row count.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;  // partial sums of a dot product, one vector register wide

inline float Widen(float v) { return v; }
inline float Widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// q . k over dh elements: eight independent lanes (the compiler keeps them in one vector register),
// summed at the end.
template <typename KV>
float Dot(const float* q, const KV* k, int64_t dh) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= dh; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += q[j + l] * Widen(k[j + l]);
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; j < dh; ++j) sum += q[j] * Widen(k[j]);
  return sum;
}

template <typename KV>
void Attend(const float* q, const KV* k_pages, const KV* v_pages, const int32_t* kv_lens, const int32_t* page_table,
            const int32_t* positions, float* out, int64_t rows, int64_t heads, int64_t dh, int64_t num_pages,
            int64_t page_size, int64_t kv_heads, int64_t table_width, float sm_scale, int64_t window, float soft_cap) {
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * dh, page_stride = page_size * token_stride;
  std::vector<float> scores;
  std::vector<const KV*> keys, values;
  for (int64_t d = 0; d < rows; ++d) {
    const int64_t end = std::min<int64_t>(kv_lens[d], static_cast<int64_t>(positions[d]) + 1);
    const int64_t begin = window > 0 ? std::max<int64_t>(0, positions[d] - window + 1) : 0;
    const int64_t n = std::max<int64_t>(0, end - begin);
    keys.resize(n);
    values.resize(n);
    scores.resize(n);
    for (int64_t h = 0; h < heads; ++h) {
      float* o = out + (d * heads + h) * dh;
      std::fill(o, o + dh, 0.0f);
      if (n == 0) continue;
      const int64_t kv_head = h / group;
      const float* qh = q + (d * heads + h) * dh;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = begin + i;
        const int64_t slot = std::min<int64_t>(t / page_size, table_width - 1);
        const int64_t page = std::clamp<int64_t>(page_table[d * table_width + slot], 0, num_pages - 1);
        const int64_t at = page * page_stride + (t % page_size) * token_stride + kv_head * dh;
        keys[i] = k_pages + at;
        values[i] = v_pages + at;
      }
      float top = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        float s = Dot(qh, keys[i], dh) * sm_scale;
        if (soft_cap > 0.0f) s = soft_cap * std::tanh(s / soft_cap);
        scores[i] = s;
        top = std::max(top, s);
      }
      float total = 0.0f;
      for (int64_t i = 0; i < n; ++i) total += (scores[i] = std::exp(scores[i] - top));
      for (int64_t i = 0; i < n; ++i) {
        const float p = scores[i];
        const KV* v = values[i];
        for (int64_t j = 0; j < dh; ++j) o[j] += p * Widen(v[j]);
      }
      const float inv = 1.0f / total;
      for (int64_t j = 0; j < dh; ++j) o[j] *= inv;
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
