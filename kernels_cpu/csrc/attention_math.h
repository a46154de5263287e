// The per-chunk math of the paged attention kernel: scores of a few rows for a chunk of cached positions, and
// their weighted values; portable (GCC/Clang vector extensions) and, for bfloat16 on CPUs with AVX512-BF16,
// with bfloat16 dot products.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kvserve {

constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// One task's rows: row r is query r / group (at position first_pos + r / group) under head r % group, with its
// online-softmax state; and the current chunk of keys and values, converted to float32.
struct Tile {
  std::vector<float> q, acc, top, total, keys, values;
  std::vector<int64_t> pos, from;
  std::vector<uint32_t> q_pairs;   // bfloat16 queries, unscaled, two dimensions a word (for dot products)
  std::vector<uint16_t> key_pairs, value_pairs;   // a chunk in AMX's B layout (amx_attention.h)
  bool amx_configured = false;
  float scale = 1.f;
  float soft_cap = 0.f;   // > 0: scores become soft_cap * tanh(score / soft_cap)
};

// An FP8 byte as the float16 bits of its value times kFp8Unit, by bit moves alone: e5m2 is float16's top byte;
// e4m3fn's sign, exponent and mantissa land in float16's places, whose exponent bias is 8 more, subnormals
// included. NaN and infinity are never stored (stores saturate).
inline uint16_t half_bits(E4m3 x) { return static_cast<uint16_t>((x.bits & 0x80) << 8 | (x.bits & 0x7F) << 7); }
inline uint16_t half_bits(E5m2 x) { return static_cast<uint16_t>(x.bits << 8); }
template <typename C>
constexpr float kFp8Unit = 1.f;
template <>
constexpr float kFp8Unit<E4m3> = 1.f / 256;

// n FP8 values as floats, each times kFp8Unit: the kernel folds 1 / kFp8Unit into its scales.
template <typename C>
void decode_fp8(const C* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {   // 16 bytes to 16 float16 to 16 floats
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    const __m256i half = std::is_same<C, E4m3>::value
        ? _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8),
                          _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7))
        : _mm256_slli_epi16(w, 8);
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(half));
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(c10::Half(half_bits(in[i]), c10::Half::from_bits()));
}

// Scores of NR rows for CW positions: the rows' scaled queries against the chunk's keys.
template <typename T, int NR, int CW>
void chunk_scores(float (&s)[NR][CW], const Tile& tile, int64_t row, const T* __restrict__ keys,
                  int64_t key_stride, int64_t head) {
  Floats<CW> scores[NR] = {};
  for (int64_t d = 0; d < head; ++d) {
    const Floats<CW> k = load<CW>(keys + d * key_stride);
    for (int r = 0; r < NR; ++r) scores[r] += tile.q[(row + r) * head + d] * k;
  }
  for (int r = 0; r < NR; ++r) store(s[r], scores[r]);
}

// Rows row..row+n (n <= NR) take a chunk of CW positions from `base`: their scores s (soft-capped here) become
// probabilities p under each row's causal and window mask, with the online softmax's running top and total
// updated and the accumulators rescaled to the new top.
template <int NR, int CW>
void update_softmax(Tile& tile, int64_t row, int n, float (&s)[NR][CW], float (&p)[NR][CW], int64_t base,
                    int64_t head) {
  if (tile.soft_cap > 0.f) {
    const float inverse_cap = 1.f / tile.soft_cap;
    for (int r = 0; r < n; ++r)
      for (int t = 0; t < CW; ++t) s[r][t] = tile.soft_cap * std::tanh(s[r][t] * inverse_cap);
  }
  constexpr int W = CW < 16 ? CW : 16, pieces = CW / W;   // a wide chunk in vectors of 16, which stay in registers
  Ints<W> offsets;
  for (int t = 0; t < W; ++t) offsets[t] = t;
  for (int r = 0; r < n; ++r) {
    // Positions past the row's own or before its window are masked; int32 offsets from `base` suffice.
    const int32_t last = static_cast<int32_t>(std::clamp<int64_t>(tile.pos[row + r] - base, -1, CW));
    const int32_t first = static_cast<int32_t>(std::clamp<int64_t>(tile.from[row + r] - base, -1, CW));
    Floats<W> scores[pieces], top_of_pieces = splat<W>(kMinusInf);
    for (int i = 0; i < pieces; ++i) {
      const Ints<W> at = offsets + i * W;
      scores[i] = (at <= last) & (at >= first) ? load<W>(s[r] + i * W) : splat<W>(kMinusInf);
      top_of_pieces = top_of_pieces > scores[i] ? top_of_pieces : scores[i];
    }
    const float chunk_top = max_of<W>(top_of_pieces);
    float* acc = tile.acc.data() + (row + r) * head;
    if (chunk_top == kMinusInf) {   // nothing here for this row
      for (int i = 0; i < pieces; ++i) store(p[r] + i * W, splat<W>(0.f));
      continue;
    }
    const float top = std::max(tile.top[row + r], chunk_top);
    const float rescale = fast_exp(tile.top[row + r] - top);   // ~0 on the row's first chunk, when top was -inf
    Floats<W> sums = {};
    for (int i = 0; i < pieces; ++i) {
      const Floats<W> probs = scores[i] == kMinusInf ? splat<W>(0.f) : fast_exp<W>(scores[i] - top);
      store(p[r] + i * W, probs);
      sums += probs;
    }
    tile.top[row + r] = top;
    tile.total[row + r] = tile.total[row + r] * rescale + sum_of<W>(sums);
#pragma omp simd
    for (int64_t d = 0; d < head; ++d) acc[d] *= rescale;
  }
}

// acc[row + r] += sum over t < valid of p[r][t] * values[t].
template <typename T, int NR, int CW>
void add_weighted_values(Tile& tile, int64_t row, const float (&p)[NR][CW], const T* __restrict__ values,
                         int64_t valid, int64_t head) {
  if (head % 16) {   // odd head sizes: plain loops
    for (int r = 0; r < NR; ++r)
      for (int64_t t = 0; t < valid; ++t)
        for (int64_t d = 0; d < head; ++d) tile.acc[(row + r) * head + d] += p[r][t] * to_f32(values[t * head + d]);
    return;
  }
  for (int64_t c = 0; c < head; c += 16) {   // 16 floats of each row's accumulator at a time, in registers
    Floats<16> a[NR];
    for (int r = 0; r < NR; ++r) a[r] = load<16>(tile.acc.data() + (row + r) * head + c);
    for (int64_t t = 0; t < valid; ++t) {
      const Floats<16> v = load<16>(values + t * head + c);
      for (int r = 0; r < NR; ++r) a[r] += p[r][t] * v;
    }
    for (int r = 0; r < NR; ++r) store(tile.acc.data() + (row + r) * head + c, a[r]);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bfloat16 read in place on CPUs with AVX512-BF16: dot products of bfloat16 pairs (vdpbf16ps) do twice the
// multiply-adds of float32 FMAs and need no conversion. Scores pair adjacent head dimensions; weighted values
// pair adjacent positions, with probabilities rounded to bfloat16 as torch's bfloat16 attention rounds them
// before its second matmul.

// [a0..a15] and [b0..b15] (bfloat16) -> [a0 b0 a1 b1 ... a15 b15]
inline __m512i interleave(const uint16_t* a, const uint16_t* b) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  return _mm512_permutexvar_epi16(order, both);
}

template <int NR>
void chunk_scores(float (&s)[NR][16], const Tile& tile, int64_t row, const uint16_t* __restrict__ keys,
                  int64_t key_stride, int64_t head) {
  if (head % 2) return chunk_scores<uint16_t, NR, 16>(s, tile, row, keys, key_stride, head);
  __m512 scores[NR];
  for (int r = 0; r < NR; ++r) scores[r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head; d += 2) {
    const __m512bh k = (__m512bh)interleave(keys + d * key_stride, keys + (d + 1) * key_stride);
    for (int r = 0; r < NR; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(tile.q_pairs[((row + r) * head + d) / 2]);
      scores[r] = _mm512_dpbf16_ps(scores[r], q, k);
    }
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(s[r], _mm512_mul_ps(scores[r], _mm512_set1_ps(tile.scale)));
}

template <int NR>
void add_weighted_values(Tile& tile, int64_t row, const float (&p)[NR][16], const uint16_t* __restrict__ values,
                         int64_t valid, int64_t head) {
  if (head % 16) return add_weighted_values<uint16_t, NR, 16>(tile, row, p, values, valid, head);
  uint32_t p_pairs[NR][8];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < 8; ++t)
      p_pairs[r][t] = from_f32<uint16_t>(p[r][2 * t]) | uint32_t{from_f32<uint16_t>(p[r][2 * t + 1])} << 16;
  alignas(64) static const uint16_t zeros[16] = {};
  for (int64_t c = 0; c < head; c += 16) {
    __m512 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm512_loadu_ps(tile.acc.data() + (row + r) * head + c);
    for (int64_t t = 0; t < valid; t += 2) {   // past `valid`, a zero row: p is 0 there, the cache undefined
      const uint16_t* next = t + 1 < valid ? values + (t + 1) * head + c : zeros;
      const __m512bh v = (__m512bh)interleave(values + t * head + c, next);
      for (int r = 0; r < NR; ++r) a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(p_pairs[r][t / 2]), v);
    }
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(tile.acc.data() + (row + r) * head + c, a[r]);
  }
}
#endif

}  // namespace kvserve
