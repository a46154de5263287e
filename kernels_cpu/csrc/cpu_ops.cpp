// Fused CPU kernels: paged decode attention read in place from the cache, and the per-token ops that torch
// would otherwise run as several passes over memory (RMSNorm, residual add, SiLU-and-mul, rotary embedding).
// Arithmetic is float32 whatever the storage dtype; results are rounded where the torch references round.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Storage types: float, uint16_t for bfloat16 bits, c10::Half. Loads and stores convert through float32; the
// bfloat16 ones are bit operations on plain integers, so that loops over them vectorize.
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t bf16) { return __builtin_bit_cast(float, static_cast<uint32_t>(bf16) << 16); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }
template <>
inline uint16_t from_f32(float x) {   // round to nearest even, as torch does
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

template <typename T>
inline float round_to(float x) { return to_f32(from_f32<T>(x)); }

// exp(x) as 2^i * 2^f with a degree-6 polynomial for 2^f on [0, 1) (relative error ~2e-7): unlike std::exp
// it vectorizes.
inline float fast_exp(float x) {
  const float t = (x < -87.f ? -87.f : (x > 88.f ? 88.f : x)) * 1.44269504f;
  const float whole = floorf(t), f = t - whole;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184374e-3f;
  p = p * f + 5.5503325e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(whole) + 127) << 23);
}

// Each kernel below does one row (or one attention task) in a plain function: loops inside the lambdas of
// at::parallel_for, whose captures the compiler must assume may alias, do not vectorize.

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

// normed = weight * to_T(x * rsqrt(mean(x^2) + eps)); with a residual, x is first to_T(x + residual), which is
// also written to summed, the new residual.
template <typename T>
void rms_norm_row(T* __restrict__ normed, T* __restrict__ summed, const T* __restrict__ x,
                  const T* __restrict__ residual, const T* __restrict__ weight, float* __restrict__ row,
                  int64_t hidden, float eps) {
  float squares = 0.f;
  if (residual) {
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) {
      const T sum = from_f32<T>(to_f32(x[i]) + to_f32(residual[i]));
      summed[i] = sum;
      row[i] = to_f32(sum);
      squares += row[i] * row[i];
    }
  } else {
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) {
      row[i] = to_f32(x[i]);
      squares += row[i] * row[i];
    }
  }
  const float inv = 1.f / std::sqrt(squares / hidden + eps);
#pragma omp simd
  for (int64_t i = 0; i < hidden; ++i) normed[i] = from_f32<T>(to_f32(weight[i]) * round_to<T>(row[i] * inv));
}

template <typename T>
void rms_norm_kernel(T* normed, T* summed, const T* x, const T* residual, const T* weight, int64_t rows,
                     int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(hidden);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * hidden;
      rms_norm_row(normed + offset, summed ? summed + offset : nullptr, x + offset,
                   residual ? residual + offset : nullptr, weight, row.data(), hidden, eps);
    }
  });
}

template <typename T>
void silu_and_mul_row(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(round_to<T>(g / (1.f + fast_exp(-g))) * to_f32(up[i]));
  }
}

template <typename T>
void silu_and_mul_kernel(T* out, const T* x, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_and_mul_row(out + r * width, x + r * 2 * width, x + r * 2 * width + width, width);
  });
}

// Rotate-half rotary embedding of one [head_size] vector.
template <typename T>
void rotate_head(T* __restrict__ out, const T* __restrict__ in, const float* __restrict__ c,
                 const float* __restrict__ s, int64_t head_size, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = to_f32(in[i]), b = to_f32(in[i + half]);
    out[i] = from_f32<T>(a * c[i] - b * s[i]);
    out[i + half] = from_f32<T>(b * c[i] + a * s[i]);
  }
  for (int64_t i = 2 * half; i < head_size; ++i) out[i] = in[i];
}

// x [tokens, heads, head_size] (any token and head strides) into a contiguous out.
template <typename T>
void rotary_kernel(T* out, const T* x, int64_t token_stride, int64_t head_stride, const float* cos,
                   const float* sin, int64_t tokens, int64_t heads, int64_t head_size, int64_t half) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        rotate_head(out + (t * heads + h) * head_size, x + t * token_stride + h * head_stride, cos + t * half,
                    sin + t * half, head_size, half);
      }
    }
  });
}

template <typename S>
S* ptr(const torch::Tensor& t) { return static_cast<S*>(t.data_ptr()); }

template <typename Body>
void dispatch(at::ScalarType type, const char* name, Body&& body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(uint16_t{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, name, ": dtype ", type, " is not float32, bfloat16 or float16");
  }
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

std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  auto input = x.contiguous();
  auto w = weight.to(input.scalar_type()).contiguous();
  auto res = residual ? residual->to(input.scalar_type()).contiguous() : torch::Tensor();
  auto normed = torch::empty_like(input);
  auto summed = residual ? torch::empty_like(input) : torch::Tensor();
  const int64_t hidden = input.size(-1);
  dispatch(input.scalar_type(), "rms_norm", [&](auto zero) {
    using scalar_t = decltype(zero);
    rms_norm_kernel<scalar_t>(ptr<scalar_t>(normed), residual ? ptr<scalar_t>(summed) : nullptr,
                              ptr<scalar_t>(input), residual ? ptr<scalar_t>(res) : nullptr,
                              ptr<scalar_t>(w), input.numel() / hidden, hidden, static_cast<float>(eps));
  });
  if (residual) return {normed, summed};
  return {normed};
}

torch::Tensor silu_and_mul(const torch::Tensor& x) {
  auto input = x.contiguous();
  const int64_t width = input.size(-1) / 2;
  auto sizes = input.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, input.options());
  dispatch(input.scalar_type(), "silu_and_mul", [&](auto zero) {
    using scalar_t = decltype(zero);
    silu_and_mul_kernel<scalar_t>(ptr<scalar_t>(out), ptr<scalar_t>(input), input.numel() / (2 * width),
                                  width);
  });
  return out;
}

torch::Tensor rotary_embedding(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_embedding takes [tokens, heads, head] with a contiguous head");
  auto c = cos.to(torch::kFloat32).contiguous();
  auto s = sin.to(torch::kFloat32).contiguous();
  auto out = torch::empty(x.sizes(), x.options());
  dispatch(x.scalar_type(), "rotary_embedding", [&](auto zero) {
    using scalar_t = decltype(zero);
    rotary_kernel<scalar_t>(ptr<scalar_t>(out), ptr<scalar_t>(x), x.stride(0), x.stride(1),
                            c.data_ptr<float>(), s.data_ptr<float>(), x.size(0), x.size(1), x.size(2), c.size(1));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged attention of one query per sequence");
  m.def("rms_norm", &rms_norm, "RMSNorm, after adding the residual when one is given");
  m.def("silu_and_mul", &silu_and_mul, "silu(first half) * second half");
  m.def("rotary_embedding", &rotary_embedding, "rotate-half rotary embedding");
}
