// What the AVX2 linear kernels share (the grouped and int8 ones where AVX-512 is missing, the FP8 one on every CPU
// with AVX2). They multiply in float32 (FMA on 8 lanes):
// rows of x are converted to float32 once, a block of 16 outputs is two vectors of sums, and a tile of the common
// tiling (tiled_linear.h) runs one block at a time in sub-tiles of at most 4 rows, since AVX2 has 16 vector
// registers rather than 32.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "tiled_linear.h"

namespace kvserve::avx2 {

constexpr int kSubRows = 4;
constexpr int kHalf = 8;   // outputs a vector holds

// Round to nearest even like torch: 8 float32 lanes to their bfloat16 bits.
inline __m128i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);   // per 128-bit lane: r0-3 r0-3 | r4-7 r4-7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

// A kernel's output, [m, n] float32 or bfloat16.
struct Outputs {
  void* data;
  int64_t n;
  bool bf16;

  void store(int64_t row, int64_t first, __m256 low, __m256 high) const {
    const int64_t valid = std::min<int64_t>(kOutBlock, n - first), at = row * n + first;
    if (bf16) {
      uint16_t bits[kOutBlock];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bits), bf16_bits(low));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bits + kHalf), bf16_bits(high));
      std::memcpy(static_cast<uint16_t*>(data) + at, bits, valid * sizeof(uint16_t));
    } else if (valid == kOutBlock) {
      _mm256_storeu_ps(static_cast<float*>(data) + at, low);
      _mm256_storeu_ps(static_cast<float*>(data) + at + kHalf, high);
    } else {
      float values[kOutBlock];
      _mm256_storeu_ps(values, low);
      _mm256_storeu_ps(values + kHalf, high);
      std::memcpy(static_cast<float*>(data) + at, values, valid * sizeof(float));
    }
  }
};

// f(std::integral_constant<int, t>) for t = 0 .. N - 1, unrolled: shifts by t need immediates. Inlined, with
// f, so that the sums f adds to stay in registers.
template <int N, class F>
__attribute__((always_inline)) inline void unrolled(F&& f) {
  [&]<int... T>(std::integer_sequence<int, T...>) __attribute__((always_inline)) {
    (f(std::integral_constant<int, T>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Kernel::tile<R, B> of tiled_linear.h as Kernel::block_tile<R, P>(row, block, prefetch) calls of at most kSubRows
// rows and one block each, P the blocks the call prefetches (the first call all B, the others none).
template <class Kernel>
struct SubTiled {
  template <int R, int B>
  void tile(int64_t row, int64_t block, Prefetch prefetch) const {
    const auto& kernel = static_cast<const Kernel&>(*this);
    kernel.template block_tile<std::min(R, kSubRows), B>(row, block, prefetch);
    if constexpr (R > kSubRows) kernel.template block_tile<R - kSubRows, 0>(row + kSubRows, block, prefetch);
    if constexpr (B == 2) tile<R, 1>(row, block + 1, Prefetch{});
  }
};

inline __m256 bias_of(const float* bias, int64_t first, int half) {
  return bias ? _mm256_loadu_ps(bias + first + half * kHalf) : _mm256_setzero_ps();
}

// R rows' float32 sums for one block of 16 outputs, from its bias: one row keeps two chains of sums per half in
// flight, so that FMA's latency does not bound it.
template <int R>
struct BlockSums {
  static constexpr int kChains = R == 1 ? 2 : 1;
  __m256 sums[R][kChains][2];

  BlockSums(const float* bias, int64_t first) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kChains; ++c)
        for (int h = 0; h < 2; ++h) sums[r][c][h] = c == 0 ? bias_of(bias, first, h) : _mm256_setzero_ps();
  }

  // Row r's sums += inputs[r * stride] * the weights of the block's two halves, on chain `chain` mod kChains.
  __attribute__((always_inline)) void multiply_add(const float* inputs, int64_t stride, int chain, __m256 w_low,
                                                   __m256 w_high) {
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_broadcast_ss(inputs + r * stride);
      __m256* s = sums[r][chain % kChains];
      s[0] = _mm256_fmadd_ps(xs, w_low, s[0]);
      s[1] = _mm256_fmadd_ps(xs, w_high, s[1]);
    }
  }

  void store(const Outputs& out, int64_t row, int64_t first) {
    for (int r = 0; r < R; ++r) {
      for (int c = 1; c < kChains; ++c)
        for (int h = 0; h < 2; ++h) sums[r][0][h] = _mm256_add_ps(sums[r][0][h], sums[r][c][h]);
      out.store(row + r, first, sums[r][0][0], sums[r][0][1]);
    }
  }
};

// The rows of x as a float32 [m, k] tensor.
inline at::Tensor float_rows(const at::Tensor& x) {
  return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous();
}

// Floats per output (scales, a bias) as float32 padded with zeros to `blocks` whole blocks.
inline at::Tensor padded_floats(const at::Tensor& values, int64_t blocks) {
  auto padded = at::zeros({blocks * kOutBlock}, values.options().dtype(at::kFloat));
  padded.narrow(0, 0, values.numel()).copy_(values);
  return padded;
}

}  // namespace kvserve::avx2
