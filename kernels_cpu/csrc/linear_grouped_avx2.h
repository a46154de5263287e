// Weight-only int4 and int8 linear layers (W4A16, W8A16) on CPUs with AVX2 but not AVX512-BF16: the contract of
// linear_grouped.cpp (weight = level * scale + offset per group of inputs, or (level - zero) * scale), for float32
// and bfloat16 inputs, in float32. With float16 scales a level l of b bits becomes the float32 1 + l / 2^b by two
// bit operations (its bits moved under the mantissa's top, 1.0's exponent set), and one FMA per 8 weights turns that
// into the weight:
//   weight = (1 + l / 2^b) * (2^b * scale) + (offset - 2^b * scale),
// with (2^b * scale) and the shifted offset computed once per group, exact for float16's 11 bits. Float32 scales
// (GGUF's K-quants, up to 18 bits) would round the shifted offset: their levels are converted instead, and each
// weight l * scale + offset (or - zero * scale) rounds once, to the dequantized weight where l * scale and
// zero * scale are exact, as K-quants' are. The products then sum straight into the outputs. The weight is packed
// as [N / 16, K / (32 / b), 16] 32-bit lanes: lane j of a step holds output j's next 32 / b levels, input t of
// them in bits [b t, b t + b).
#pragma once

#include "common.h"

#if !KVSERVE_AVX512_BF16 && KVSERVE_AVX2
#include "avx2_linear.h"

namespace {

using namespace kvserve;
using namespace kvserve::avx2;

constexpr uint32_t kOneBits = 0x3F800000;   // 1.0f

__m256 load_8(const c10::Half* halves) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves)));
}
__m256 load_8(const float* floats) { return _mm256_loadu_ps(floats); }

template <int Bits, typename Scale>
struct GroupedLinear : SubTiled<GroupedLinear<Bits, Scale>> {
  static constexpr int kPerLane = 32 / Bits;
  // A level's code: 1 + l / 2^Bits for float16 scales, its weight code * (2^Bits * scale) + offset - 2^Bits * scale;
  // l itself for float32 ones.
  static constexpr bool kLevelCodes = std::is_same_v<Scale, c10::Half>;
  static constexpr float kCodeScale = kLevelCodes ? 1 << Bits : 1;
  static constexpr float kBase = kLevelCodes ? 1 << Bits : 0;

  const float* x;
  int64_t k, steps, groups, group_steps;
  const uint32_t* weight;   // packed
  const Scale* scales;      // [N / 16, groups, 2, 16] (pack_group_scales)
  const float* bias;        // padded, or nullptr
  Outputs out;
  bool zero_points;

  // Input T's level's code in every lane.
  template <int T>
  static __m256 level_code(__m256i lanes) {
    if constexpr (kLevelCodes) {
      constexpr int shift = 23 - Bits - Bits * T;
      __m256i moved;
      if constexpr (shift >= 0) moved = _mm256_slli_epi32(lanes, shift);
      else moved = _mm256_srli_epi32(lanes, -shift);
      const __m256i mask = _mm256_set1_epi32(((1 << Bits) - 1) << (23 - Bits));
      return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(moved, mask), _mm256_set1_epi32(kOneBits)));
    } else {
      const __m256i level = _mm256_and_si256(_mm256_srli_epi32(lanes, Bits * T), _mm256_set1_epi32((1 << Bits) - 1));
      return _mm256_cvtepi32_ps(level);
    }
  }

  template <int R, int PrefetchBlocks>
  void block_tile(int64_t row, int64_t block, Prefetch prefetch) const {
    const int64_t first = block * kOutBlock;
    BlockSums<R> sums(bias, first);
    const uint32_t* lanes = weight + block * steps * kOutBlock;
    const __m256 base = _mm256_set1_ps(kBase), code_scale = _mm256_set1_ps(kCodeScale);
    for (int64_t g = 0; g < groups; ++g) {
      const Scale* group_scales = scales + (block * groups + g) * 2 * kOutBlock;
      __m256 scale[2], offset[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 s = load_8(group_scales + h * kHalf), second = load_8(group_scales + kOutBlock + h * kHalf);
        scale[h] = _mm256_mul_ps(s, code_scale);
        offset[h] = zero_points ? _mm256_mul_ps(_mm256_add_ps(second, base), _mm256_sub_ps(_mm256_setzero_ps(), s))
                                : _mm256_fnmadd_ps(base, s, second);
      }
      const int64_t end = std::min(steps, (g + 1) * group_steps);
      for (int64_t s = g * group_steps; s < end; ++s) {
        prefetch.step<PrefetchBlocks>(s);
        const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + s * kOutBlock));
        const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + s * kOutBlock + kHalf));
        const float* inputs = x + row * k + s * kPerLane;
        unrolled<kPerLane>([&](auto t) __attribute__((always_inline)) {
          constexpr int T = decltype(t)::value;
          const __m256 w_low = _mm256_fmadd_ps(level_code<T>(low), scale[0], offset[0]);
          const __m256 w_high = _mm256_fmadd_ps(level_code<T>(high), scale[1], offset[1]);
          sums.multiply_add(inputs + T, k, T, w_low, w_high);
        });
      }
    }
    sums.store(out, row, first);
  }
};

template <int Bits, typename Scale>
void run_grouped(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales,
                 const at::Tensor& bias, at::Tensor& out, int64_t group_size, bool zero_points) {
  const GroupedLinear<Bits, Scale> kernel{
      {}, ptr<const float>(input), input.size(1), packed.size(1), scales.size(1), group_size / (32 / Bits),
      ptr<const uint32_t>(packed), ptr<const Scale>(scales), bias.defined() ? ptr<const float>(bias) : nullptr,
      Outputs{out.data_ptr(), out.size(1), out.scalar_type() == at::kBFloat16}, zero_points};
  for_each_tile(kernel, input.size(0), packed.size(0));
}

}  // namespace

at::Tensor linear_grouped(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t group_size,
                             bool zero_points, int64_t bits) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear_grouped takes float32 or bfloat16 inputs");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 3 && scales.dim() == 4 &&
              (bits == 4 || bits == 8),
              "linear_grouped takes a weight and scales from pack_linear_grouped, of 4 or 8 bits");
  const auto input = float_rows(x);
  const int64_t m = input.size(0), k = input.size(1), groups = scales.size(1);
  TORCH_CHECK(packed.size(1) * (32 / bits) == k && packed.size(0) * kOutBlock >= n &&
              groups == (k + group_size - 1) / group_size,
              "linear_grouped: the input's width does not match the packed weight");
  const auto b = bias ? padded_floats(*bias, packed.size(0)) : at::Tensor();
  auto out = at::empty({m, n}, x.options());
  dispatch_grouped(bits, scales, [&](auto levels, auto scale) {
    run_grouped<decltype(levels)::value, decltype(scale)>(input, packed, scales, b, out, group_size, zero_points);
  });
  return shaped_like_input(out, x);
}

// `second` is the offsets or the zero points (integers) per output and group.
std::vector<at::Tensor> pack_linear_grouped(const at::Tensor& qweight, const at::Tensor& scale,
                                               const at::Tensor& second, int64_t group_size, int64_t bits) {
  check_grouped_levels(qweight, scale, group_size, bits);
  const int64_t n = qweight.size(0), k = qweight.size(1), per_lane = 32 / bits;
  const int64_t blocks = (n + kOutBlock - 1) / kOutBlock, steps = k / per_lane;
  auto levels = at::zeros({blocks * kOutBlock, k}, qweight.options().dtype(at::kLong));
  levels.narrow(0, 0, n).copy_(qweight);
  const auto shifts = at::arange(per_lane, levels.options()) * bits;
  auto lanes = levels.view({blocks, kOutBlock, steps, per_lane}).__lshift__(shifts).sum(-1).permute({0, 2, 1});
  lanes = at::where(lanes >= (int64_t{1} << 31), lanes - (int64_t{1} << 32), lanes);   // as int32 bits
  auto packed = empty_on_huge_pages(lanes.sizes(), lanes.options().dtype(at::kInt)).copy_(lanes);
  return {packed, pack_group_scales(scale, second, blocks)};
}

bool linear_grouped_supported(const std::string& dtype) { return dtype == "float32" || dtype == "bfloat16"; }
std::string linear_grouped_isa() { return "AVX2"; }

#endif
