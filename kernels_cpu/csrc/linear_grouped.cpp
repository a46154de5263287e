// Weight-only int4 and int8 linear layers (W4A16, W8A16) on CPUs with AVX512-BF16: weight = level * scale +
// offset per group of inputs, or (level - zero) * scale with integer zero points (GPTQ, AWQ, compressed-tensors),
// levels 0-15 or 0-255, bfloat16 activations. Scales and offsets are float16 where float16 holds them all, else
// float32 (GGUF's K-quants: a float16 d times an integer sub-scale). A 4-bit level (a nibble) becomes the
// bfloat16 number 128 + level by one bit operation (0x4300 is 128, and levels fill its low mantissa bits), so that
// vdpbf16ps sums a group's x * (128 + level) exactly as it sums bfloat16 products. An 8-bit level's low nibble
// does the same, and its high nibble h becomes 2048 + 16 h (0x4500: at 2048 the mantissa's step is 16), so that the
// two products sum x * (base + level) with base 2176. Each group's sums then take its scale and offset:
//   out += scale * sum + (offset - base * scale) * sum_x,   sum_x the group's sum of inputs,
// where a zero point's offset - base * scale is -(base + zero) * scale.
// The weight is packed as [N / 16, K / 8 or K / 4, 32] 16-bit words: word 2j + i of a step holds, in its four
// nibbles t = 0..3, output j's inputs 8 * step + 2t + i (4 bits), or nibble t % 2 of its input
// 4 * step + 2 (t / 2) + i (8 bits): the input pairs that vdpbf16ps takes, four nibbles in one load.
#include <cstring>

#include "common.h"
#include "kernels.h"

#if KVSERVE_AVX512_BF16 || KVSERVE_AVX2
#include <type_traits>

#include "tiled_linear.h"

namespace {

using namespace kvserve;

// body(std::integral_constant<int, bits>{}, Scale{}) for levels of `bits` bits and scales stored as Scale:
// c10::Half or float.
template <typename Body>
void dispatch_grouped(int64_t bits, const at::Tensor& scales, Body&& body) {
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat,
              "linear_grouped takes float16 or float32 scales from pack_linear_grouped");
  const auto with_scales = [&](auto levels) {
    if (scales.scalar_type() == at::kHalf) body(levels, c10::Half{});
    else body(levels, float{});
  };
  if (bits == 4) with_scales(std::integral_constant<int, 4>{});
  else with_scales(std::integral_constant<int, 8>{});
}

}  // namespace
#endif

#if KVSERVE_AVX512_BF16
namespace {

using namespace kvserve;

constexpr int kNibblesPerWord = 4;
constexpr int kSumChunk = 16;      // sum_x adds 16 inputs at a time

constexpr int64_t step_inputs(int bits) { return bits == 4 ? 8 : 4; }

__m512 load_16(const c10::Half* halves) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves)));
}
__m512 load_16(const float* floats) { return _mm512_loadu_ps(floats); }

template <int Bits, typename Scale>
struct GroupedLinear {
  static constexpr float kBase = Bits == 4 ? 128.f : 2176.f;

  const uint16_t* x;
  int64_t x_stride, steps, n;
  const float* x_sums;      // [m, groups]
  int64_t groups, group_steps;
  const uint16_t* weight;   // packed
  const Scale* scales;      // [N / 16, groups, 2, 16]: each block's scales, then its offsets or zeros
  const uint16_t* bias;     // bfloat16, or nullptr
  uint16_t* out;
  bool zero_points;

  template <int R, int B>
  void tile(int64_t row, int64_t block, Prefetch prefetch) const {
    // Two blocks' group sums and outputs would not fit the 32 vector registers at 8 rows: one block at a time.
    block_tile<R, B>(row, block, prefetch);
    if constexpr (B == 2) block_tile<R, 0>(row, block + 1, prefetch);
  }

  template <int R, int PrefetchBlocks>
  void block_tile(int64_t row, int64_t block, Prefetch prefetch) const {
    const int64_t first = block * kOutBlock;
    const __mmask16 valid = valid_outputs(first, n);
    __m512 outs[R];
    __m512 start = _mm512_setzero_ps();
    if (bias) start = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                              _mm256_maskz_loadu_epi16(valid, bias + first)), 16));
    for (int r = 0; r < R; ++r) outs[r] = start;
    const __m512i low_nibble = _mm512_set1_epi16(0x000F), bf16_128 = _mm512_set1_epi16(0x4300),
                  bf16_2048 = _mm512_set1_epi16(0x4500);
    const uint16_t* words = weight + block * steps * 32;
    const uint16_t* rows = x + row * x_stride;
    for (int64_t g = 0; g < groups; ++g) {
      // vdpbf16ps waits for its previous sum: a few rows keep several chains of sums in flight.
      constexpr int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
      __m512 sums[R][A];
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < A; ++a) sums[r][a] = _mm512_setzero_ps();
      const int64_t end = std::min(steps, (g + 1) * group_steps);
      for (int64_t s = g * group_steps; s < end; ++s) {
        prefetch.step<PrefetchBlocks>(s);
        const __m512i packed = _mm512_loadu_si512(words + s * 32);
#pragma GCC unroll 4
        for (int t = 0; t < kNibblesPerWord; ++t) {
          // (packed >> 4t) & 0xF | 0x4300: the bfloat16 bits of 128 + nibble (2048 + 16 nibble for a high one)
          const __m512i exponent = Bits == 8 && t % 2 ? bf16_2048 : bf16_128;
          const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(packed, 4 * t), low_nibble,
                                                                 exponent, 0xEA);
          const int a = t % A, pair_index = Bits == 4 ? t : t / 2;   // known at compile time
          for (int r = 0; r < R; ++r) {
            int32_t pair;
            std::memcpy(&pair, rows + r * x_stride + s * step_inputs(Bits) + 2 * pair_index, sizeof(pair));
            sums[r][a] = _mm512_dpbf16_ps(sums[r][a], (__m512bh)_mm512_set1_epi32(pair), w);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int a = 1; a < A; ++a) sums[r][0] = _mm512_add_ps(sums[r][0], sums[r][a]);
      const Scale* group_scales = scales + (block * groups + g) * 2 * kOutBlock;
      const __m512 scale = load_16(group_scales), second = load_16(group_scales + kOutBlock);
      // offset - base * scale is exact in float32 for float16 scales unless the two are more than 2^13 apart;
      // for float32 ones it may round, about as much as scale * sum does
      const __m512 base = _mm512_set1_ps(kBase);
      const __m512 shifted_offset = zero_points
                                        ? _mm512_fnmadd_ps(_mm512_add_ps(second, base), scale, _mm512_setzero_ps())
                                        : _mm512_fnmadd_ps(base, scale, second);
      for (int r = 0; r < R; ++r) {
        const __m512 sum_x = _mm512_set1_ps(x_sums[(row + r) * groups + g]);
        outs[r] = _mm512_fmadd_ps(shifted_offset, sum_x, _mm512_fmadd_ps(scale, sums[r][0], outs[r]));
      }
    }
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(out + (row + r) * n + first, valid, (__m256i)_mm512_cvtneps_pbh(outs[r]));
  }
};

// Each row's sum of inputs in every group of `group` inputs (both multiples of 16).
at::Tensor group_sums(const at::Tensor& input, int64_t group, int64_t groups) {
  const int64_t m = input.size(0), k = input.size(1), stride = input.stride(0);
  auto sums = at::empty({m, groups}, input.options().dtype(at::kFloat));
  const uint16_t* x = ptr<const uint16_t>(input);
  float* out = ptr<float>(sums);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = g * group; i < std::min(k, (g + 1) * group); i += kSumChunk) {
          const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * stride + i));
          acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
        }
        out[r * groups + g] = _mm512_reduce_add_ps(acc);
      }
  });
  return sums;
}

template <int Bits, typename Scale>
void run_grouped(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& scales,
                 const at::Tensor& bias, at::Tensor& out, int64_t group_size, bool zero_points) {
  const int64_t n = out.size(1), groups = scales.size(1);
  const auto sums = group_sums(input, group_size, groups);
  const GroupedLinear<Bits, Scale> kernel{
      ptr<const uint16_t>(input), input.stride(0), packed.size(1), n, ptr<const float>(sums), groups,
      group_size / step_inputs(Bits), ptr<const uint16_t>(packed), ptr<const Scale>(scales),
      bias.defined() ? ptr<const uint16_t>(bias) : nullptr, ptr<uint16_t>(out), zero_points};
  for_each_tile(kernel, input.size(0), packed.size(0));
}

}  // namespace

at::Tensor linear_grouped(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t group_size,
                             bool zero_points, int64_t bits) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "linear_grouped takes bfloat16 inputs");
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.dim() == 3 && scales.dim() == 4 &&
              (bits == 4 || bits == 8),
              "linear_grouped takes a weight and scales from pack_linear_grouped, of 4 or 8 bits");
  auto input = x.reshape({-1, x.size(-1)});
  if (input.stride(1) != 1) input = input.contiguous();
  const int64_t m = input.size(0), k = input.size(1), groups = scales.size(1);
  TORCH_CHECK(packed.size(1) * step_inputs(bits) == k && packed.size(0) * kOutBlock >= n &&
              groups == (k + group_size - 1) / group_size,
              "linear_grouped: the input's width does not match the packed weight");
  auto b = bias ? bias->to(at::kBFloat16).contiguous() : at::Tensor();
  auto out = at::empty({m, n}, input.options());
  dispatch_grouped(bits, scales, [&](auto levels, auto scale) {
    run_grouped<decltype(levels)::value, decltype(scale)>(input, packed, scales, b, out, group_size, zero_points);
  });
  return shaped_like_input(out, x);
}

// `second` is the offsets or the zero points (integers) per output and group.
std::vector<at::Tensor> pack_linear_grouped(const at::Tensor& qweight, const at::Tensor& scale,
                                               const at::Tensor& second, int64_t group_size, int64_t bits) {
  check_grouped_levels(qweight, scale, group_size, bits);
  const int64_t n = qweight.size(0), k = qweight.size(1);
  const int64_t blocks = (n + kOutBlock - 1) / kOutBlock, steps = k / step_inputs(bits);
  auto levels = at::zeros({blocks * kOutBlock, k}, qweight.options().dtype(at::kInt));
  levels.narrow(0, 0, n).copy_(qweight);
  at::Tensor nibbles;   // [block, step, j, i, t]
  if (bits == 4) {   // [block, j, step, t, i]
    nibbles = levels.view({blocks, kOutBlock, steps, kNibblesPerWord, 2}).permute({0, 2, 1, 4, 3});
  } else {   // [block, j, step, pair, i, half]: nibble t = 2 pair + half
    auto halves = at::stack({levels.bitwise_and(0xF), levels.__rshift__(4)}, -1)
                      .view({blocks, kOutBlock, steps, 2, 2, 2});
    nibbles = halves.permute({0, 2, 1, 4, 3, 5}).reshape({blocks, steps, kOutBlock, 2, kNibblesPerWord});
  }
  auto nibble_values = at::tensor({1, 1 << 4, 1 << 8, 1 << 12}, levels.options());
  auto words = (nibbles * nibble_values).sum(-1).to(at::kShort).reshape({blocks, steps, 2 * kOutBlock});
  auto packed = empty_on_huge_pages(words.sizes(), words.options()).copy_(words);
  return {packed, pack_group_scales(scale, second, blocks)};
}

bool linear_grouped_supported(const std::string& dtype) { return dtype == "bfloat16"; }
std::string linear_grouped_isa() { return "AVX512-BF16"; }

#elif !KVSERVE_AVX2

at::Tensor linear_grouped(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, int64_t, int64_t, bool, int64_t) {
  TORCH_CHECK(false, "linear_grouped needs a CPU with AVX512-BF16 or AVX2");
}
std::vector<at::Tensor> pack_linear_grouped(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               int64_t, int64_t) {
  TORCH_CHECK(false, "linear_grouped needs a CPU with AVX512-BF16 or AVX2");
}
bool linear_grouped_supported(const std::string&) { return false; }
std::string linear_grouped_isa() { return ""; }

#endif

#include "linear_grouped_avx2.h"   // on CPUs with AVX2 but not AVX512-BF16: one build, one header parse

// This part's operators; weight packing and the feature check run once, at load.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_grouped(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int out_features, int group_size, "
        "bool zero_points, int bits) -> Tensor");
  m.def("pack_linear_grouped(Tensor qweight, Tensor scale, Tensor second, int group_size, int bits) -> Tensor[]",
        &pack_linear_grouped);
  m.def("linear_grouped_supported(str dtype) -> bool", &linear_grouped_supported);
  m.def("linear_grouped_isa() -> str", &linear_grouped_isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_grouped", &linear_grouped);
}
