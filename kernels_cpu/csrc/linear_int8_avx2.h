// W8A8 int8 linear layers on CPUs with AVX2 but not AVX512-VNNI: the contract of linear_int8.cpp (rows of x
// quantized per row to [-127, 127], the weight per output, int32 sums scaled back to floats), in AVX2's integer
// products. vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16: it takes |weight| and x with
// the weight's signs (a weight may be -128, x is within [-127, 127]), so that a pair sums at most 2 * 128 * 127
// and never saturates; vpmaddwd then adds pairs of those
// into the int32 sums of each output's quad of inputs. The weight is packed as [N / 16, K / 4, 16, 4] int8.
#pragma once

#include "common.h"

#if !KVSERVE_AVX512_VNNI && KVSERVE_AVX2
#include "avx2_linear.h"
#include "int8_rows.h"

namespace {

using namespace kvserve;
using namespace kvserve::avx2;

struct Int8Linear : SubTiled<Int8Linear> {
  const int8_t* x;           // rows quantized, [m, steps * 4]
  const float* x_scales;     // [m]
  int64_t steps;             // quads of inputs
  const int8_t* weight;      // packed
  const float* w_scales;     // padded
  const float* bias;         // padded, or nullptr
  Outputs out;

  template <int R, int PrefetchBlocks>
  void block_tile(int64_t row, int64_t block, Prefetch prefetch) const {
    __m256i sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    const int8_t* weights = weight + block * steps * 4 * kOutBlock;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t q = 0; q < steps; ++q) {
      prefetch.step<PrefetchBlocks>(q);
      __m256i w[2], magnitudes[2];
      for (int h = 0; h < 2; ++h) {
        w[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weights + (q * kOutBlock + h * kHalf) * 4));
        magnitudes[h] = _mm256_abs_epi8(w[h]);   // -128's is 128 as an unsigned byte
      }
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, x + (row + r) * steps * 4 + q * 4, sizeof(quad));
        const __m256i xs = _mm256_set1_epi32(quad);
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitudes[h], _mm256_sign_epi8(xs, w[h]));
          sums[r][h] = _mm256_add_epi32(sums[r][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    const int64_t first = block * kOutBlock;
    for (int r = 0; r < R; ++r) {
      __m256 v[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(w_scales + first + h * kHalf),
                                            _mm256_set1_ps(x_scales[row + r]));
        v[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), scales, bias_of(bias, first, h));
      }
      out.store(row + r, first, v[0], v[1]);
    }
  }
};

}  // namespace

// `shift` is unused here (the AVX-512 kernel's correction for its unsigned rows).
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& shift,
                          const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias) {
  const auto input = int8_input_rows(x, packed, w_scales);
  const int64_t m = input.size(0), n = w_scales.size(0), quads = packed.size(1), blocks = packed.size(0);
  const auto rows = quantize_input(input, quads, 0);
  const auto scales = padded_floats(w_scales, blocks);
  const auto b = bias ? padded_floats(*bias, blocks) : at::Tensor();
  auto out = at::empty({m, n}, input.options());
  const Int8Linear kernel{{}, ptr<const int8_t>(rows.levels), ptr<const float>(rows.scales), quads,
                          ptr<const int8_t>(packed), ptr<const float>(scales), bias ? ptr<const float>(b) : nullptr,
                          Outputs{out.data_ptr(), n, x.scalar_type() == at::kBFloat16}};
  for_each_tile(kernel, m, blocks);
  return shaped_like_input(out, x);
}

std::vector<at::Tensor> pack_linear_int8(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "pack_linear_int8 takes an int8 [out, in]");
  return {pack_blocked(qweight, 4), at::zeros({0}, qweight.options().dtype(at::kInt))};
}

bool linear_int8_supported() { return true; }
std::string linear_int8_isa() { return "AVX2"; }

#endif
