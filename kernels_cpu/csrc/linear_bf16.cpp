// bfloat16 linear layers on CPUs with AVX512-BF16: out = x @ weight.T (+ bias), float32 sums of bfloat16
// products (vdpbf16ps). The weight is packed once so that each 16 outputs' pairs of inputs lie together:
// [N / 16, K / 2, 16, 2]. A gated MLP's gate-up layer can also end in its SiLU-and-mul: its gate and up blocks
// are packed in turns, so that a tile's two blocks hold 16 gate outputs and their up outputs.
#include <cstring>

#include "common.h"
#include "kernels.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "tiled_linear.h"
#include "amx_linear.h"

namespace {

using namespace kvserve;

struct Bf16Linear {
  using Element = uint16_t;
  const uint16_t* x;
  int64_t x_stride, steps, n;   // steps: pairs of inputs
  const uint16_t* weight;   // packed
  const uint16_t* bias;     // or nullptr
  uint16_t* out;
  int64_t gated = 0;        // a gate-up layer's intermediate size, its output silu(gate) * up; 0 for x @ weight.T

  int64_t inputs() const { return steps * 2; }

  // Where block `block`'s outputs sit in the unpacked weight (and its bias).
  int64_t first_output(int64_t block) const {
    return gated ? block % 2 * gated + block / 2 * kOutBlock : block * kOutBlock;
  }

  // Block `block`'s 16 biases as floats, or zeros.
  __m512 bias_of(int64_t block) const {
    if (!bias) return _mm512_setzero_ps();
    const int64_t first = first_output(block);
    const __m256i bits = _mm256_maskz_loadu_epi16(valid_outputs(first, n), bias + first);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }

  template <int R, int B>
  void tile(int64_t row, int64_t block, Prefetch prefetch) const {
    __m512 sums[R][B];
    for (int b = 0; b < B; ++b) {
      const __m512 start = bias_of(block + b);
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
    store(sums, row, block);
  }

  // One row's float32 sums of `blocks` (1 or 2) blocks from `block`, 16 each, as AMX's tiles leave them.
  void store_sums(const float* row_sums, int64_t row, int64_t block, int64_t blocks) const {
    const auto sum = [&](int b) {
      return _mm512_add_ps(_mm512_loadu_ps(row_sums + b * kOutBlock), bias_of(block + b));
    };
    if (blocks == 2) {
      const __m512 sums[1][2] = {{sum(0), sum(1)}};
      return store<1, 2>(sums, row, block);
    }
    const __m512 sums[1][1] = {{sum(0)}};
    store<1, 1>(sums, row, block);
  }

  template <int R, int B>
  void store(const __m512 (&sums)[R][B], int64_t row, int64_t block) const {
    if constexpr (B == 2) {
      if (gated) return store_silu_and_mul(sums, row, block / 2 * kOutBlock);
    }
    for (int b = 0; b < B; ++b) {
      const int64_t first = (block + b) * kOutBlock;
      for (int r = 0; r < R; ++r)
        _mm256_mask_storeu_epi16(out + (row + r) * n + first, valid_outputs(first, n),
                                 (__m256i)_mm512_cvtneps_pbh(sums[r][b]));
    }
  }

  // out = silu(gate) * up with the roundings of the linear layer, then silu_and_mul: gate and up rounded to
  // bfloat16, silu(gate) rounded, the product rounded.
  template <int R>
  void store_silu_and_mul(const __m512 (&sums)[R][2], int64_t row, int64_t first) const {
    const auto rounded = [](__m512 v) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
    };
    for (int r = 0; r < R; ++r) {
      Floats<16> gate, up;
      const __m512 g = rounded(sums[r][0]), u = rounded(sums[r][1]);
      std::memcpy(&gate, &g, sizeof(g));
      std::memcpy(&up, &u, sizeof(u));
      const Floats<16> silu = gate / (1.f + fast_exp<16>(-gate));
      __m512 activated;
      std::memcpy(&activated, &silu, sizeof(silu));
      const __m512 product = _mm512_mul_ps(rounded(activated), u);
      _mm256_mask_storeu_epi16(out + (row + r) * gated + first, valid_outputs(first, gated),
                               (__m256i)_mm512_cvtneps_pbh(product));
    }
  }
};

// x @ weight.T + bias for n outputs; with `gated`, silu(gate) * up of the gate-up layer's `gated` outputs.
at::Tensor run_bf16_linear(const at::Tensor& x, const at::Tensor& packed,
                              const c10::optional<at::Tensor>& bias, int64_t n, int64_t gated) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_bf16 takes bfloat16 inputs and weights");
  auto input = x.reshape({-1, x.size(-1)});
  if (input.stride(1) != 1) input = input.contiguous();
  const int64_t m = input.size(0), num_blocks = packed.size(0);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == input.size(1) && num_blocks * kOutBlock >= n,
              "linear_bf16: the input's width does not match the packed weight");
  auto b = bias ? bias->to(at::kBFloat16).contiguous() : at::Tensor();
  const int64_t width = gated ? gated : n;
  auto out = at::empty({m, width}, input.options());
  auto sizes = x.sizes().vec();
  sizes.back() = width;
  const Bf16Linear kernel{ptr<const uint16_t>(input), input.stride(0), packed.size(1), n, ptr<const uint16_t>(packed),
                          bias ? ptr<const uint16_t>(b) : nullptr, ptr<uint16_t>(out), gated};
#ifdef KVSERVE_AMX
  if (runs_on_amx(m, input.size(1) * 2)) {
    amx_for_each_task(kernel, m, num_blocks);
    return out.view(sizes);
  }
#endif
  for_each_tile(kernel, m, num_blocks);
  return out.view(sizes);
}

}  // namespace

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                          int64_t n) {
  return run_bf16_linear(x, packed, bias, n, 0);
}

at::Tensor gate_up_bf16(const at::Tensor& x, const at::Tensor& packed,
                           const c10::optional<at::Tensor>& bias, int64_t intermediate) {
  TORCH_CHECK(packed.size(0) * kOutBlock == 2 * intermediate, "gate_up_bf16: the packed weight has ",
              packed.size(0) * kOutBlock, " outputs, not twice the intermediate size ", intermediate);
  return run_bf16_linear(x, packed, bias, 2 * intermediate, intermediate);
}

at::Tensor pack_linear_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % 2 == 0, "pack_linear_bf16 takes [out, in] with an even in");
  return pack_blocked(weight.to(at::kBFloat16), 2);
}

at::Tensor pack_gate_up_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % (2 * kOutBlock) == 0 && weight.size(1) % 2 == 0,
              "pack_gate_up_bf16 takes [gate; up] of an intermediate size divisible by 16, and an even in");
  const int64_t blocks = weight.size(0) / kOutBlock / 2, in = weight.size(1);
  auto turns = weight.view({2, blocks, kOutBlock, in}).transpose(0, 1).reshape({-1, in});   // g0 u0 g1 u1 ...
  return pack_linear_bf16(turns);
}

bool linear_bf16_supported() { return true; }

std::string linear_bf16_isa() {
#ifdef KVSERVE_AMX
  if (amx_permitted()) return "AMX-BF16 from 16 rows, AVX512-BF16 below";
#endif
  return "AVX512-BF16";
}

#else

at::Tensor linear_bf16(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
}
at::Tensor gate_up_bf16(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  TORCH_CHECK(false, "gate_up_bf16 needs a CPU with AVX512-BF16");
}
at::Tensor pack_linear_bf16(const at::Tensor&) { TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16"); }
at::Tensor pack_gate_up_bf16(const at::Tensor&) {
  TORCH_CHECK(false, "gate_up_bf16 needs a CPU with AVX512-BF16");
}
bool linear_bf16_supported() { return false; }
std::string linear_bf16_isa() { return ""; }

#endif

// This part's operators; weight packing and the feature check run once, at load.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("gate_up_bf16(Tensor x, Tensor packed, Tensor? bias, int intermediate_size) -> Tensor");
  m.def("pack_linear_bf16(Tensor weight) -> Tensor", &pack_linear_bf16);
  m.def("pack_gate_up_bf16(Tensor weight) -> Tensor", &pack_gate_up_bf16);
  m.def("linear_bf16_supported() -> bool", &linear_bf16_supported);
  m.def("linear_bf16_isa() -> str", &linear_bf16_isa);   // what the kernel runs on: "" where it does not run
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("gate_up_bf16", &gate_up_bf16);
}
