// Per-token ops that torch runs as several passes over memory: RMSNorm (after a residual add), SiLU-and-mul,
// rotary embedding; a row argmax for greedy sampling; and the operator registrations.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace {

using namespace kvserve;

// Each kernel does one row in a plain function: loops inside the lambdas of at::parallel_for, whose captures
// the compiler must assume may alias, do not vectorize.

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

// 16 lanes at a time through the vector fast_exp: as a plain loop, the compiler's if-conversion of fast_exp's
// clamps computed the division once per clamp case.
template <typename T>
void silu_and_mul_row(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up, int64_t width) {
  constexpr int kLanes = 16;
  int64_t i = 0;
  for (; i + kLanes <= width; i += kLanes) {
    alignas(64) float g[kLanes];
    for (int j = 0; j < kLanes; ++j) g[j] = to_f32(gate[i + j]);
    const Floats<kLanes> x = load<kLanes>(g);
    store(g, x / (1.f + fast_exp<kLanes>(-x)));
    for (int j = 0; j < kLanes; ++j) out[i + j] = from_f32<T>(round_to<T>(g[j]) * to_f32(up[i + j]));
  }
  for (; i < width; ++i) {
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

// The first index of the row's largest value; of its first NaN when it has one.
int64_t argmax_row(const float* __restrict__ row, int64_t n) {
  Floats<16> top = splat<16>(-std::numeric_limits<float>::infinity());
  Ints<16> nan = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Floats<16> v = load<16>(row + i);
    top = v > top ? v : top;
    nan |= v != v;
  }
  float best = max_of<16>(top);   // NaN never enters top: comparisons with it are false
  bool has_nan = false;
  for (int lane = 0; lane < 16; ++lane) has_nan |= nan[lane] != 0;
  for (; i < n; ++i) {
    best = std::max(best, row[i]);
    has_nan |= std::isnan(row[i]);
  }
  int64_t found = 0;
  while (found < n && !(has_nan ? std::isnan(row[found]) : row[found] == best)) ++found;
  return found < n ? found : 0;
}
}  // namespace


std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, double eps) {
  auto input = x.contiguous();
  auto w = weight.to(input.scalar_type()).contiguous();
  auto res = residual ? residual->to(input.scalar_type()).contiguous() : at::Tensor();
  auto normed = at::empty_like(input);
  auto summed = residual ? at::empty_like(input) : at::Tensor();
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

at::Tensor silu_and_mul(const at::Tensor& x) {
  auto input = x.contiguous();
  const int64_t width = input.size(-1) / 2;
  auto sizes = input.sizes().vec();
  sizes.back() = width;
  auto out = at::empty(sizes, input.options());
  dispatch(input.scalar_type(), "silu_and_mul", [&](auto zero) {
    using scalar_t = decltype(zero);
    silu_and_mul_kernel<scalar_t>(ptr<scalar_t>(out), ptr<scalar_t>(input), input.numel() / (2 * width),
                                  width);
  });
  return out;
}

// Each row's first largest value, NaN counting as the largest, as torch.argmax (whose CPU loop is scalar: 1.3 ms
// for a [32, 49152] float32 batch of logits here, against 0.27 ms for a vector max and a scan for its index).
at::Tensor argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "argmax takes float32 [rows, n]");
  auto input = x.contiguous();
  auto out = at::empty({input.size(0)}, input.options().dtype(at::kLong));
  const float* data = input.data_ptr<float>();
  int64_t* index = out.data_ptr<int64_t>();
  const int64_t n = input.size(1);
  at::parallel_for(0, input.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) index[r] = argmax_row(data + r * n, n);
  });
  return out;
}

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_embedding takes [tokens, heads, head] with a contiguous head");
  auto c = cos.to(at::kFloat).contiguous();
  auto s = sin.to(at::kFloat).contiguous();
  auto out = at::empty(x.sizes(), x.options());
  dispatch(x.scalar_type(), "rotary_embedding", [&](auto zero) {
    using scalar_t = decltype(zero);
    rotary_kernel<scalar_t>(ptr<scalar_t>(out), ptr<scalar_t>(x), x.stride(0), x.stride(1),
                            c.data_ptr<float>(), s.data_ptr<float>(), x.size(0), x.size(1), x.size(2), c.size(1));
  });
  return out;
}

// The core's kernels are operators (torch.ops.kvserve_cpu_core.*), so that CPU graphs record and replay their calls
// like torch's own.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, int window, float value_scale, float soft_cap) -> Tensor");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, float key_scale, "
        "float value_scale) -> ()");
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> Tensor[]");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("paged_attention_isa() -> str", &paged_attention_isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("store_kv", &store_kv);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("argmax", &argmax);
}
