// bfloat16 linear layers on CPUs with AVX512-BF16: out = x @ weight.T (+ bias), float32 sums of bfloat16
// products (vdpbf16ps). The weight is packed once so that each 16 outputs' pairs of inputs lie together:
// [N / 16, K / 2, 16, 2]. A tile of up to 8 rows and 32 outputs keeps its 16 sums in registers; one row reads
// the weight once at memory speed, which is what a decode step of few sequences is bound by.
#include <cstring>

#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

namespace {

using namespace kvserve;

constexpr int64_t kBlock = 16;        // outputs a vector of sums holds
constexpr int kMaxRows = 8;           // rows of a tile
constexpr int kMaxBlocks = 2;         // output blocks of a tile
constexpr int64_t kRowGroup = 256;    // rows a task covers: their inputs stay in L2 while it sweeps the weight

struct Operands {
  const uint16_t* x;
  int64_t x_stride, k_pairs, n;
  const uint16_t* weight;   // packed
  const uint16_t* bias;     // or nullptr
  uint16_t* out;
};

template <int R, int B>
void tile(const Operands& op, int64_t row, int64_t block) {
  __m512 sums[R][B];
  for (int b = 0; b < B; ++b) {
    const int64_t first = (block + b) * kBlock;
    __m512 start = _mm512_setzero_ps();
    if (op.bias) {
      const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(kBlock, op.n - first)) - 1);
      const __m256i bits = _mm256_maskz_loadu_epi16(valid, op.bias + first);
      start = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    for (int r = 0; r < R; ++r) sums[r][b] = start;
  }
  const uint16_t* weights = op.weight + block * op.k_pairs * 2 * kBlock;
  const uint16_t* x = op.x + row * op.x_stride;
  for (int64_t p = 0; p < op.k_pairs; ++p) {
    __m512bh w[B];
    for (int b = 0; b < B; ++b) w[b] = (__m512bh)_mm512_loadu_si512(weights + (b * op.k_pairs + p) * 2 * kBlock);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * op.x_stride + 2 * p, sizeof(pair));
      const __m512bh xs = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < B; ++b) sums[r][b] = _mm512_dpbf16_ps(sums[r][b], xs, w[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t first = (block + b) * kBlock;
    const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(kBlock, op.n - first)) - 1);
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(op.out + (row + r) * op.n + first, valid, (__m256i)_mm512_cvtneps_pbh(sums[r][b]));
  }
}

template <int B>
void rows_of(const Operands& op, int64_t row, int64_t rows, int64_t block) {
  switch (rows) {
    case 1: return tile<1, B>(op, row, block);
    case 2: return tile<2, B>(op, row, block);
    case 3: return tile<3, B>(op, row, block);
    case 4: return tile<4, B>(op, row, block);
    case 5: return tile<5, B>(op, row, block);
    case 6: return tile<6, B>(op, row, block);
    case 7: return tile<7, B>(op, row, block);
    default: return tile<8, B>(op, row, block);
  }
}

}  // namespace

torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                          int64_t n) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "linear_bf16 takes bfloat16 inputs and weights");
  auto input = x.reshape({-1, x.size(-1)});
  if (input.stride(1) != 1) input = input.contiguous();
  const int64_t m = input.size(0), num_blocks = packed.size(0);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 2 == input.size(1) && num_blocks * kBlock >= n,
              "linear_bf16: the input's width does not match the packed weight");
  auto b = bias ? bias->to(at::kBFloat16).contiguous() : torch::Tensor();
  auto out = torch::empty({m, n}, input.options());
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  const Operands op{ptr<const uint16_t>(input), input.stride(0), packed.size(1), n, ptr<const uint16_t>(packed),
                    bias ? ptr<const uint16_t>(b) : nullptr, ptr<uint16_t>(out)};
  const int64_t panels = (num_blocks + kMaxBlocks - 1) / kMaxBlocks, groups = (m + kRowGroup - 1) / kRowGroup;
  // Panels vary fastest: a thread's consecutive tasks share their rows.
  at::parallel_for(0, panels * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % panels * kMaxBlocks, first_row = task / panels * kRowGroup;
      const int64_t last_row = std::min(m, first_row + kRowGroup);
      for (int64_t row = first_row; row < last_row; row += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, last_row - row);
        if (num_blocks - block >= 2) rows_of<2>(op, row, rows, block);
        else rows_of<1>(op, row, rows, block);
      }
    }
  });
  return out.view(sizes);
}

torch::Tensor pack_linear_bf16(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % 2 == 0, "pack_linear_bf16 takes [out, in] with an even in");
  const int64_t n = weight.size(0), k = weight.size(1), blocks = (n + kBlock - 1) / kBlock;
  auto padded = torch::zeros({blocks * kBlock, k}, weight.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({blocks, kBlock, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

bool linear_bf16_supported() { return true; }

#else

torch::Tensor linear_bf16(const torch::Tensor&, const torch::Tensor&, const c10::optional<torch::Tensor>&, int64_t) {
  TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16");
}
torch::Tensor pack_linear_bf16(const torch::Tensor&) { TORCH_CHECK(false, "linear_bf16 needs a CPU with AVX512-BF16"); }
bool linear_bf16_supported() { return false; }

#endif
