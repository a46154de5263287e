// bfloat16 linear layers on CPUs with AVX512-BF16: out = x @ weight.T (+ bias), float32 sums of bfloat16
// products (vdpbf16ps). The weight is packed once so that each 16 outputs' pairs of inputs lie together:
// [N / 16, K / 2, 16, 2].
#include <cstring>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "tiled_linear.h"

namespace {

using namespace kvserve;

struct Bf16Linear {
  const uint16_t* x;
  int64_t x_stride, steps, n;   // steps: pairs of inputs
  const uint16_t* weight;   // packed
  const uint16_t* bias;     // or nullptr
  uint16_t* out;

  template <int R, int B>
  void tile(int64_t row, int64_t block, Prefetch prefetch) const {
    __m512 sums[R][B];
    for (int b = 0; b < B; ++b) {
      const int64_t first = (block + b) * kOutBlock;
      __m512 start = _mm512_setzero_ps();
      if (bias) {
        const __m256i bits = _mm256_maskz_loadu_epi16(valid_outputs(first, n), bias + first);
        start = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      }
      for (int r = 0; r < R; ++r) sums[r][b] = start;
    }
    const uint16_t* weights = weight + block * steps * 2 * kOutBlock;
    const uint16_t* rows = x + row * x_stride;
    for (int64_t p = 0; p < steps; ++p) {
      prefetch.step<B>(p);
      __m512bh w[B];
      for (int b = 0; b < B; ++b) w[b] = (__m512bh)_mm512_loadu_si512(weights + (b * steps + p) * 2 * kOutBlock);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, rows + r * x_stride + 2 * p, sizeof(pair));
        const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
        for (int b = 0; b < B; ++b) sums[r][b] = _mm512_dpbf16_ps(sums[r][b], xs, w[b]);
      }
    }
    for (int b = 0; b < B; ++b) {
      const int64_t first = (block + b) * kOutBlock;
      for (int r = 0; r < R; ++r)
        _mm256_mask_storeu_epi16(out + (row + r) * n + first, valid_outputs(first, n),
                                 (__m256i)_mm512_cvtneps_pbh(sums[r][b]));
    }
  }
};

}  // namespace

torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                          int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_bf16 takes bfloat16 inputs and weights");
  auto input = x.reshape({-1, x.size(-1)});
  if (input.stride(1) != 1) input = input.contiguous();
  const int64_t m = input.size(0), num_blocks = packed.size(0);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == input.size(1) && num_blocks * kOutBlock >= n,
              "linear_bf16: the input's width does not match the packed weight");
  auto b = bias ? bias->to(at::kBFloat16).contiguous() : torch::Tensor();
  auto out = torch::empty({m, n}, input.options());
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  const Bf16Linear kernel{ptr<const uint16_t>(input), input.stride(0), packed.size(1), n, ptr<const uint16_t>(packed),
                          bias ? ptr<const uint16_t>(b) : nullptr, ptr<uint16_t>(out)};
  for_each_tile(kernel, m, num_blocks);
  return out.view(sizes);
}

torch::Tensor pack_linear_bf16(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % 2 == 0, "pack_linear_bf16 takes [out, in] with an even in");
  return pack_blocked(weight.to(at::kBFloat16), 2);
}

bool linear_bf16_supported() { return true; }

#else

torch::Tensor linear_bf16(const torch::Tensor&, const torch::Tensor&, const c10::optional<torch::Tensor>&, int64_t) {
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
}
torch::Tensor pack_linear_bf16(const torch::Tensor&) { TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16"); }
bool linear_bf16_supported() { return false; }

#endif
