// FP8 (e4m3) weight linear layers on CPUs with AVX2 (those with AVX-512 too): weight = fp8 * scale, the scale per
// output and group of inputs (a group of all inputs for per-channel scales); float32 or bfloat16 inputs, float32
// products. W8A8 layers' inputs are first rounded to their e4m3 steps (per token, per group of inputs, or with a
// static scale), as the FP8 GEMM of a GPU would quantize them. An e4m3 byte becomes float16 by bit operations alone:
// sign-extended to 16 bits and shifted left by 7, its exponent and mantissa fill float16's from the top, at 2^-8
// of the value (float16's exponent bias is 8 more) and once the stray copy of the sign is cleared; vcvtph2ps widens
// 8 at a time and 2^8 joins the scales. The weight is packed as [N / 16, K, 16] bytes: each input's 16 outputs.
#include "common.h"
#include "kernels.h"

#if KVSERVE_AVX2
#include "avx2_linear.h"

namespace {

using namespace kvserve;
using namespace kvserve::avx2;

constexpr int64_t kStepInputs = 4;   // 64 bytes, the tiling's step
constexpr float kFp8Max = 448.f, kMinAbsMax = 1e-12f;

struct Fp8Linear : SubTiled<Fp8Linear> {
  const float* x;
  int64_t k, steps, groups, group_steps;
  const uint8_t* weight;   // packed
  const float* scales;     // [N / 16, groups, 16], times 2^8
  const float* bias;       // padded, or nullptr
  Outputs out;

  template <int R, int PrefetchBlocks>
  void block_tile(int64_t row, int64_t block, Prefetch prefetch) const {
    const int64_t first = block * kOutBlock;
    BlockSums<R> sums(bias, first);
    const uint8_t* bytes = weight + block * steps * kStepInputs * kOutBlock;
    const __m256i fields = _mm256_set1_epi16(static_cast<int16_t>(0xBF80));   // sign, exponent and mantissa
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 scale_low = _mm256_loadu_ps(scales + (block * groups + g) * kOutBlock);
      const __m256 scale_high = _mm256_loadu_ps(scales + (block * groups + g) * kOutBlock + kHalf);
      const int64_t end = std::min(steps, (g + 1) * group_steps);
      for (int64_t s = g * group_steps; s < end; ++s) {
        prefetch.step<PrefetchBlocks>(s);
        for (int t = 0; t < kStepInputs; ++t) {
          const int64_t input = s * kStepInputs + t;
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + input * kOutBlock));
          const __m256i half = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(raw), 7), fields);
          const __m256 w_low = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(half)), scale_low);
          const __m256 w_high = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(half, 1)), scale_high);
          sums.multiply_add(x + row * k + input, k, t, w_low, w_high);
        }
      }
    }
    sums.store(out, row, first);
  }
};

// Each row's values rounded to e4m3 steps: of input_scale, or (input_scale 0) of max|x| / 448 per group of
// `group` inputs.
void round_to_e4m3_steps(at::Tensor& rows, int64_t group, float input_scale) {
  const int64_t m = rows.size(0), k = rows.size(1);
  float* x = ptr<float>(rows);
  at::parallel_for(0, m, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t start = 0; start < k; start += group) {
        float* values = x + r * k + start;
        const int64_t count = std::min(group, k - start);
        float scale = input_scale;
        if (scale == 0.f) {
          float amax = 0.f;
          for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::abs(values[i]));
          scale = std::max(amax, kMinAbsMax) / kFp8Max;
        }
        for (int64_t i = 0; i < count; ++i) {
          const float level = std::clamp(values[i] / scale, -kFp8Max, kFp8Max);
          values[i] = static_cast<float>(c10::Float8_e4m3fn(level)) * scale;
        }
      }
  });
}

}  // namespace

// input_group 0: weight-only; else W8A8 with inputs rounded per group of input_group, or with input_scale.
at::Tensor linear_fp8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t group_size, int64_t input_group,
                         double input_scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear_fp8 takes float32 or bfloat16 inputs");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && scales.scalar_type() == at::kFloat &&
              scales.dim() == 3 && group_size % kStepInputs == 0,
              "linear_fp8 takes a weight and scales from pack_linear_fp8");
  auto input = float_rows(x);
  const int64_t m = input.size(0), k = input.size(1), groups = scales.size(1);
  TORCH_CHECK(packed.size(1) == k && packed.size(0) * kOutBlock >= n && groups == (k + group_size - 1) / group_size,
              "linear_fp8: the input's width does not match the packed weight");
  if (input_group > 0) {
    if (input.data_ptr() == x.data_ptr()) input = input.clone();
    round_to_e4m3_steps(input, input_group, static_cast<float>(input_scale));
  }
  const auto b = bias ? padded_floats(*bias, packed.size(0)) : at::Tensor();
  auto out = at::empty({m, n}, x.options());
  const Fp8Linear kernel{{}, ptr<const float>(input), k, k / kStepInputs, groups, group_size / kStepInputs,
                         ptr<const uint8_t>(packed), ptr<const float>(scales),
                         bias ? ptr<const float>(b) : nullptr,
                         Outputs{out.data_ptr(), n, x.scalar_type() == at::kBFloat16}};
  for_each_tile(kernel, m, packed.size(0));
  return shaped_like_input(out, x);
}

// An e4m3 weight [n, k] (k a multiple of 4) and its float32 scales, [n] or [n, groups] per group of group_size.
std::vector<at::Tensor> pack_linear_fp8(const at::Tensor& weight, const at::Tensor& scale,
                                           int64_t group_size) {
  const int64_t n = weight.size(0), k = weight.size(1), groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::ScalarType::Float8_e4m3fn && k % kStepInputs == 0 &&
              group_size % kStepInputs == 0 && scale.scalar_type() == at::kFloat && scale.size(0) == n &&
              (scale.dim() == 1 ? groups == 1 : scale.size(1) == groups),
              "pack_linear_fp8 takes a float8_e4m3fn [out, in] weight, in and the group size multiples of 4, and "
              "float32 scales [out] or [out, groups]");
  const int64_t blocks = (n + kOutBlock - 1) / kOutBlock;
  const auto packed = pack_blocked(weight.view(at::kByte), 1).view({blocks, k, kOutBlock});
  auto padded = at::zeros({blocks * kOutBlock, groups}, scale.options());
  padded.narrow(0, 0, n).copy_(scale.view({n, -1}) * 256.f);
  return {packed, padded.view({blocks, kOutBlock, groups}).transpose(1, 2).contiguous()};
}

bool linear_fp8_supported() { return true; }
std::string linear_fp8_isa() { return "AVX2"; }

#else

at::Tensor linear_fp8(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const c10::optional<at::Tensor>&, int64_t, int64_t, int64_t, double) {
  TORCH_CHECK(false, "linear_fp8 needs a CPU with AVX2");
}
std::vector<at::Tensor> pack_linear_fp8(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "linear_fp8 needs a CPU with AVX2");
}
bool linear_fp8_supported() { return false; }
std::string linear_fp8_isa() { return ""; }

#endif

// This part's operators; weight packing and the feature check run once, at load.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_fp8(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int out_features, int group_size, "
        "int input_group, float input_scale) -> Tensor");
  m.def("pack_linear_fp8(Tensor weight, Tensor scale, int group_size) -> Tensor[]", &pack_linear_fp8);
  m.def("linear_fp8_supported() -> bool", &linear_fp8_supported);
  m.def("linear_fp8_isa() -> str", &linear_fp8_isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_fp8", &linear_fp8);
}
