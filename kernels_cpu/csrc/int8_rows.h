// W8A8's inputs, for the int8 kernels of every CPU: each row of x quantized to [-127, 127] with the scale
// max|x| / 127, the levels stored plus a shift (128 where the multiply wants unsigned bytes, else 0) and padded
// with the shift to whole quads of inputs.
#pragma once

#include <cmath>
#include <cstring>

#include "common.h"

namespace kvserve {

constexpr float kMinAbsMax = 1e-6f;   // a row of zeros still gets a finite scale

inline uint32_t abs_bits(float x) { return __builtin_bit_cast(uint32_t, x) & 0x7FFFFFFFu; }
inline uint32_t abs_bits(uint16_t bf16) { return (static_cast<uint32_t>(bf16) & 0x7FFFu) << 16; }

// Integer maxima of the magnitudes' bits order like the magnitudes, and unlike a float max the loop vectorizes.
template <typename T>
void quantize_rows(const T* x, int64_t stride, int64_t m, int64_t k, int64_t padded, uint8_t shift, uint8_t* q,
                   float* scales) {
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * stride;
      uint32_t amax = 0;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, abs_bits(row[i]));
      const float scale = std::max(__builtin_bit_cast(float, amax), kMinAbsMax) / 127.f;
      scales[r] = scale;
      uint8_t* out = q + r * padded;
      for (int64_t i = 0; i < k; ++i)
        out[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(to_f32(row[i]) / scale)) + shift);
      std::memset(out + k, shift, padded - k);
    }
  });
}

struct QuantizedRows {
  at::Tensor levels;   // uint8 [m, quads * 4]
  at::Tensor scales;   // float32 [m]
};

// The rows of x [m, k] (float32 or bfloat16, unit stride along k) for a weight of `quads` quads of inputs.
inline QuantizedRows quantize_input(const at::Tensor& input, int64_t quads, uint8_t shift) {
  const int64_t m = input.size(0), k = input.size(1);
  QuantizedRows rows{at::empty({m, quads * 4}, input.options().dtype(at::kByte)),
                     at::empty({m}, input.options().dtype(at::kFloat))};
  if (input.scalar_type() == at::kBFloat16)
    quantize_rows(ptr<const uint16_t>(input), input.stride(0), m, k, quads * 4, shift, ptr<uint8_t>(rows.levels),
                  ptr<float>(rows.scales));
  else
    quantize_rows(ptr<const float>(input), input.stride(0), m, k, quads * 4, shift, ptr<uint8_t>(rows.levels),
                  ptr<float>(rows.scales));
  return rows;
}

// linear_int8's checks on every CPU; x as rows [m, k] with unit stride along k.
inline at::Tensor int8_input_rows(const at::Tensor& x, const at::Tensor& packed,
                                     const at::Tensor& w_scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear_int8 takes float32 or bfloat16 inputs");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && w_scales.scalar_type() == at::kFloat,
              "linear_int8 takes a weight from pack_linear_int8 and float32 scales");
  auto input = x.reshape({-1, x.size(-1)});
  if (input.stride(1) != 1) input = input.contiguous();
  TORCH_CHECK(packed.size(1) == (input.size(1) + 3) / 4 && packed.size(0) * 16 >= w_scales.size(0),
              "linear_int8: the input's width does not match the packed weight");
  return input;
}

}  // namespace kvserve
