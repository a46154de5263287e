// int8 linear layers on CPUs with AVX512-VNNI (W8A8): each row of x is quantized to [-127, 127] with the scale
// max|x| / 127, the weight was quantized per output; int32 sums of their products (vpdpbusd) are scaled back to
// floats. vpdpbusd multiplies unsigned by signed bytes, so rows are stored shifted by +128 and 128 times each
// output's weight sum comes back off. The weight is packed as [N / 16, K / 4, 16, 4] int8.
#include <cstring>

#include "common.h"
#include "kernels.h"

#if KVSERVE_AVX512_VNNI
#include "int8_rows.h"
#include "tiled_linear.h"
#include "amx_linear.h"

namespace {

using namespace kvserve;

// Round to nearest even like torch, with integer operations any AVX-512 CPU has.
inline __m256i to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

struct Int8Linear {
  using Element = uint8_t;
  const uint8_t* x;          // rows quantized and shifted, [m, steps * 4]
  const float* x_scales;     // [m]
  int64_t steps, n;          // steps: quads of inputs
  const int8_t* weight;      // packed
  const int32_t* shift;      // 128 * each output's weight sum, padded to whole blocks
  const float* w_scales;     // [n]
  const float* bias;         // [n] or nullptr
  void* out;
  bool bf16_out;
  int64_t x_stride = steps * 4;

  int64_t inputs() const { return steps * 4; }

  template <int R, int B>
  void tile(int64_t row, int64_t block, Prefetch prefetch) const {
    __m512i sums[R][B];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) sums[r][b] = _mm512_setzero_si512();
    const int8_t* weights = weight + block * steps * 4 * kOutBlock;
    const uint8_t* rows = x + row * steps * 4;
    for (int64_t q = 0; q < steps; ++q) {
      prefetch.step<B>(q);
      __m512i w[B];
      for (int b = 0; b < B; ++b) w[b] = _mm512_loadu_si512(weights + (b * steps + q) * 4 * kOutBlock);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, rows + (r * steps + q) * 4, sizeof(quad));
        const __m512i xs = _mm512_set1_epi32(quad);
        for (int b = 0; b < B; ++b) sums[r][b] = _mm512_dpbusd_epi32(sums[r][b], xs, w[b]);
      }
    }
    for (int b = 0; b < B; ++b)
      for (int r = 0; r < R; ++r) store(sums[r][b], row + r, block + b);
  }

  // One row's int32 sums of `blocks` (1 or 2) blocks from `block`, 16 each, as AMX's tiles leave them.
  void store_sums(const int32_t* row_sums, int64_t row, int64_t block, int64_t blocks) const {
    for (int b = 0; b < blocks; ++b) store(_mm512_loadu_si512(row_sums + b * kOutBlock), row, block + b);
  }

  // A row's 16 outputs of block `block` from their integer sums: the shift off, both scales and the bias on.
  void store(__m512i sums, int64_t row, int64_t block) const {
    const int64_t first = block * kOutBlock;
    const __mmask16 valid = valid_outputs(first, n);
    const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_loadu_si512(shift + first)));
    const __m512 scales = _mm512_maskz_loadu_ps(valid, w_scales + first);
    const __m512 offsets = bias ? _mm512_maskz_loadu_ps(valid, bias + first) : _mm512_setzero_ps();
    const __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(sum, _mm512_set1_ps(x_scales[row])), scales, offsets);
    const int64_t at = row * n + first;
    if (bf16_out) _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + at, valid, to_bf16_bits(v));
    else _mm512_mask_storeu_ps(static_cast<float*>(out) + at, valid, v);
  }
};

}  // namespace

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& shift,
                          const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias) {
  const auto input = int8_input_rows(x, packed, w_scales);
  const int64_t m = input.size(0), n = w_scales.size(0), quads = packed.size(1);
  const auto rows = quantize_input(input, quads, 128);
  auto b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({m, n}, input.options());
  const Int8Linear kernel{ptr<const uint8_t>(rows.levels), ptr<const float>(rows.scales), quads, n,
                          ptr<const int8_t>(packed), ptr<const int32_t>(shift), ptr<const float>(w_scales),
                          bias ? ptr<const float>(b) : nullptr, out.data_ptr(), x.scalar_type() == at::kBFloat16};
#ifdef KVSERVE_AMX
  if (runs_on_amx(m, quads * 4)) {
    amx_for_each_task(kernel, m, packed.size(0));
    return shaped_like_input(out, x);
  }
#endif
  for_each_tile(kernel, m, packed.size(0));
  return shaped_like_input(out, x);
}

std::vector<at::Tensor> pack_linear_int8(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "pack_linear_int8 takes an int8 [out, in]");
  auto packed = pack_blocked(qweight, 4);
  auto shift = at::zeros({packed.size(0) * kOutBlock}, qweight.options().dtype(at::kInt));
  shift.narrow(0, 0, qweight.size(0)).copy_(qweight.sum(1, false, at::kInt) * 128);
  return {packed, shift};
}

bool linear_int8_supported() { return true; }
std::string linear_int8_isa() {
#ifdef KVSERVE_AMX
  if (amx_permitted()) return "AMX-INT8 from 16 rows, AVX512-VNNI below";
#endif
  return "AVX512-VNNI";
}

#elif !KVSERVE_AVX2

at::Tensor linear_int8(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_int8 needs a CPU with AVX512-VNNI or AVX2");
}
std::vector<at::Tensor> pack_linear_int8(const at::Tensor&) {
  TORCH_CHECK(false, "linear_int8 needs a CPU with AVX512-VNNI or AVX2");
}
bool linear_int8_supported() { return false; }
std::string linear_int8_isa() { return ""; }

#endif

#include "linear_int8_avx2.h"   // on CPUs with AVX2 but not AVX512-VNNI: one build, one header parse

// This part's operators; weight packing and the feature check run once, at load.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_int8(Tensor x, Tensor packed, Tensor shift, Tensor w_scales, Tensor? bias) -> Tensor");
  m.def("pack_linear_int8(Tensor qweight) -> Tensor[]", &pack_linear_int8);
  m.def("linear_int8_supported() -> bool", &linear_int8_supported);
  m.def("linear_int8_isa() -> str", &linear_int8_isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_int8", &linear_int8);
}
