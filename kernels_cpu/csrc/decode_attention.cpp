// Paged decode attention that reads keys and values in place from the cache, one (sequence, kv head) per task.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace {

using namespace kvserve;

// Each kernel does one task in a plain function: loops inside the lambdas of at::parallel_for, whose captures
// the compiler must assume may alias, do not vectorize.

// One sequence and kv head: its group of queries (pre-scaled, float) over n cached positions from `first`.
// HEAD > 0 fixes the head size at compile time, which lets the per-position loops unroll fully.
template <typename T, int64_t HEAD>
void attend(float* __restrict__ acc, float* __restrict__ scores, float* __restrict__ row, const float* __restrict__ q,
            const T* __restrict__ keys, const T* __restrict__ values, const int64_t* __restrict__ table,
            int64_t first, int64_t n, int64_t group, int64_t runtime_head_size, int64_t block_size) {
  const int64_t head_size = HEAD > 0 ? HEAD : runtime_head_size;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = first + t;
    const T* k = keys + (table[pos / block_size] * block_size + pos % block_size) * head_size;
    for (int64_t d = 0; d < head_size; ++d) row[d] = to_f32(k[d]);   // converted once for the whole group
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * head_size;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_size; ++d) dot += qg[d] * row[d];
      scores[g * n + t] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    float top = s[0];
    for (int64_t t = 1; t < n; ++t) top = s[t] > top ? s[t] : top;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = fast_exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) s[t] *= inv;
  }
  for (int64_t i = 0; i < group * head_size; ++i) acc[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = first + t;
    const T* v = values + (table[pos / block_size] * block_size + pos % block_size) * head_size;
    for (int64_t d = 0; d < head_size; ++d) row[d] = to_f32(v[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + t];
      float* a = acc + g * head_size;
#pragma omp simd
      for (int64_t d = 0; d < head_size; ++d) a[d] += p * row[d];
    }
  }
}

// out[seq, head] = softmax(q . k * scale) v over the sequence's cached keys, one (sequence, kv head) per task.
template <typename T>
void decode_attention_kernel(T* out, const T* query, const T* key_cache, const T* value_cache,
                             const int64_t* block_tables, const int64_t* seq_lens, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_size, int64_t num_blocks,
                             int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t head_stride = num_blocks * block_size * head_size;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_size), acc(group * head_size), row(head_size), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const T* q_in = query + (seq * num_heads + kv_head * group) * head_size;
      for (int64_t i = 0; i < group * head_size; ++i) q[i] = to_f32(q_in[i]) * scale;
      scores.resize(group * (len - first));
      auto run = head_size == 64 ? attend<T, 64> : head_size == 128 ? attend<T, 128> : attend<T, 0>;
      run(acc.data(), scores.data(), row.data(), q.data(), key_cache + kv_head * head_stride, value_cache + kv_head * head_stride,
          block_tables + seq * max_blocks, first, len - first, group, head_size, block_size);
      T* o = out + (seq * num_heads + kv_head * group) * head_size;
      for (int64_t i = 0; i < group * head_size; ++i) o[i] = from_f32<T>(acc[i]);
    }
  });
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& kv_cache,
                               const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                               int64_t window) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 5 && kv_cache.is_contiguous(), "bad decode_attention shapes");
  auto q = query.to(kv_cache.scalar_type()).contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2), block_size = kv_cache.size(3);
  dispatch(q.scalar_type(), "decode_attention", [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* cache = ptr<scalar_t>(kv_cache);
    decode_attention_kernel<scalar_t>(ptr<scalar_t>(out), ptr<scalar_t>(q), cache,
                                      cache + kv_cache.stride(0), tables.data_ptr<int64_t>(),
                                      lens.data_ptr<int64_t>(), q.size(0), q.size(1), num_kv_heads, q.size(2),
                                      num_blocks, block_size, tables.size(1), static_cast<float>(scale), window);
  });
  return out.to(query.scalar_type());
}
