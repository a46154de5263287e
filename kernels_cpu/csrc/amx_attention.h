// Paged attention's tasks of many rows (prefill tiles, and decodes of wide head groups) on AMX tiles, for a
// bfloat16 cache: the task's rows, 16 a tile, take spans of 64 positions, their scores Q K^T and weighted values
// P V as tile dot products of bfloat16 pairs into float32, with the online softmax between them on vectors
// (update_softmax, whose per-row work a wide span amortizes). A span's keys and values are repacked once a task
// into AMX's B layout: keys as pairs of head dimensions, values as pairs of positions. The probabilities go into
// P V as two bfloat16 parts, the rounded value and what rounding left, so that P V keeps float32's precision as the
// vector path does: rounded once, W8A8 int8's SmolLM2 read its test text at a perplexity 4% higher.
#pragma once

#include "amx_tiles.h"
#include "attention_math.h"

#if defined(KVSERVE_AMX) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KVSERVE_AMX_ATTENTION 1

namespace kvserve {

constexpr int kAmxChunk = 16;            // positions of a tile of scores, read from one block
constexpr int kAmxSpan = 4 * kAmxChunk;  // positions a step: four tiles of scores, two of probabilities

// Whether a task of `rows` rows runs on tiles: more rows than the vector path shares a key load among, chunks of
// 16 positions within a block, whole tile rows of head dimensions (32), and tile data permitted by Linux.
inline bool attention_on_amx(int64_t rows, int64_t block_size, int64_t head) {
  return rows > 4 && block_size % kAmxChunk == 0 && head % 32 == 0 && amx_permitted();
}

// Every tile 16 rows of 64 bytes. For scores: 0-3 a span's scores (16 positions each), 4 queries (32 dimensions),
// 5-6 keys (16 dimension pairs x 16 positions). For weighted values: 0-3 accumulators (16 dimensions each), 4-5
// values (16 position pairs x 16 dimensions), 6-7 probabilities (32 positions each).
inline void configure_attention_tiles(Tile& tile) {
  if (tile.amx_configured) return;
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kAmxRows;
    config.colsb[t] = kAmxRowBytes;
  }
  _tile_loadconfig(&config);
  tile.amx_configured = true;
}

// Chunk j (0-3) of a span: keys [head][key_stride] (a block's, transposed) -> key_pairs [4][head / 2][16][2];
// values [valid][head] -> value_pairs [2][head / 16][16][16][2], zeros past `valid` (where the cache is undefined
// and the probabilities 0). A chunk past the sequence's end (keys null) packs zeros.
inline void pack_chunk(Tile& tile, int j, const uint16_t* keys, int64_t key_stride, const uint16_t* values,
                       int64_t valid, int64_t head) {
  alignas(64) static const uint16_t zeros[16] = {};
  uint16_t* key_pairs = tile.key_pairs.data() + j * head * kAmxChunk;
  for (int64_t d = 0; d < head; d += 2)
    _mm512_storeu_si512(key_pairs + d * 16, keys ? interleave(keys + d * key_stride, keys + (d + 1) * key_stride)
                                                 : _mm512_setzero_si512());
  uint16_t* value_pairs = tile.value_pairs.data() + j / 2 * head * 2 * kAmxChunk + j % 2 * 8 * 32;
  for (int64_t c = 0; c < head; c += 16)
    for (int64_t t = 0; t < kAmxChunk; t += 2) {
      const uint16_t* even = t < valid ? values + t * head + c : zeros;
      const uint16_t* odd = t + 1 < valid ? values + (t + 1) * head + c : zeros;
      _mm512_storeu_si512(value_pairs + (c / 16 * 16 + t / 2) * 32, interleave(even, odd));
    }
}

// C tile c += A tile a times B tile b, loaded from `from`.
#define KVSERVE_LOAD_DOT(c, a, b, from)    \
  _tile_loadd(b, from, kAmxRowBytes); \
  _tile_dpbf16ps(c, a, b);

// The 16 rows' accumulators from dimension c, blocks of 16 on tiles 0-3 (2-3 only where `four`), += the
// probabilities (tiles 6 and 7, 32 positions each) times the span's values: the blocks' dot products overlap.
inline void add_weighted_values(float* acc, const uint16_t* value_pairs, int64_t head, int64_t c, bool four) {
  const int64_t stride = head * sizeof(float), block = 16 * 32;   // a block: 16 position pairs of 16 dimensions
  const uint16_t* first = value_pairs + c * 32;                    // positions 0-31
  const uint16_t* second = first + head * 32;                      // positions 32-63
  _tile_loadd(0, acc + c, stride);
  _tile_loadd(1, acc + c + 16, stride);
  if (four) {
    _tile_loadd(2, acc + c + 32, stride);
    _tile_loadd(3, acc + c + 48, stride);
  }
  KVSERVE_LOAD_DOT(0, 6, 4, first);
  KVSERVE_LOAD_DOT(1, 6, 5, first + block);
  if (four) {
    KVSERVE_LOAD_DOT(2, 6, 4, first + 2 * block);
    KVSERVE_LOAD_DOT(3, 6, 5, first + 3 * block);
  }
  KVSERVE_LOAD_DOT(0, 7, 4, second);
  KVSERVE_LOAD_DOT(1, 7, 5, second + block);
  if (four) {
    KVSERVE_LOAD_DOT(2, 7, 4, second + 2 * block);
    KVSERVE_LOAD_DOT(3, 7, 5, second + 3 * block);
  }
  _tile_stored(0, acc + c, stride);
  _tile_stored(1, acc + c + 16, stride);
  if (four) {
    _tile_stored(2, acc + c + 32, stride);
    _tile_stored(3, acc + c + 48, stride);
  }
}

// 16 rows from `row` (queries in tile.q_pairs, [rows][head] bfloat16) take a packed span from `base`: n of them
// are the task's, the rest padding whose results are never read.
inline void amx_attend_span(Tile& tile, int64_t row, int n, int64_t base, int64_t head) {
  const uint16_t* queries = reinterpret_cast<const uint16_t*>(tile.q_pairs.data()) + row * head;
  alignas(64) float s[kAmxRows][kAmxSpan], p[kAmxRows][kAmxSpan];
  alignas(64) uint16_t p_high[kAmxRows][kAmxSpan], p_low[kAmxRows][kAmxSpan];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t d = 0; d < head; d += 32) {
    _tile_loadd(4, queries + d, head * sizeof(uint16_t));
    const uint16_t* keys = tile.key_pairs.data() + d * 16;
    KVSERVE_LOAD_DOT(0, 4, 5, keys);
    KVSERVE_LOAD_DOT(1, 4, 6, keys + head * kAmxChunk);
    KVSERVE_LOAD_DOT(2, 4, 5, keys + 2 * head * kAmxChunk);
    KVSERVE_LOAD_DOT(3, 4, 6, keys + 3 * head * kAmxChunk);
  }
  constexpr int64_t s_stride = kAmxSpan * sizeof(float);
  _tile_stored(0, &s[0][0], s_stride);
  _tile_stored(1, &s[0][16], s_stride);
  _tile_stored(2, &s[0][32], s_stride);
  _tile_stored(3, &s[0][48], s_stride);
  const __m512 scale = _mm512_set1_ps(tile.scale);
  for (int r = 0; r < n; ++r)
    for (int t = 0; t < kAmxSpan; t += 16) _mm512_storeu_ps(&s[r][t], _mm512_mul_ps(_mm512_loadu_ps(&s[r][t]), scale));
  update_softmax(tile, row, n, s, p, base, head);
  for (int r = 0; r < kAmxRows; ++r)
    for (int t = 0; t < kAmxSpan; t += 16) {
      const __m512 x = r < n ? _mm512_loadu_ps(&p[r][t]) : _mm512_setzero_ps();
      const __m256bh high = _mm512_cvtneps_pbh(x);
      const __m512 high_value = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)high), 16));
      const __m512 rest = _mm512_sub_ps(x, high_value);
      _mm256_storeu_si256((__m256i*)&p_high[r][t], (__m256i)high);
      _mm256_storeu_si256((__m256i*)&p_low[r][t], (__m256i)_mm512_cvtneps_pbh(rest));
    }
  float* acc = tile.acc.data() + row * head;
  _tile_loadd(6, &p_high[0][0], kAmxSpan * sizeof(uint16_t));
  _tile_loadd(7, &p_high[0][32], kAmxSpan * sizeof(uint16_t));
  for (int64_t c = 0; c < head; c += 64) add_weighted_values(acc, tile.value_pairs.data(), head, c, c + 64 <= head);
  _tile_loadd(6, &p_low[0][0], kAmxSpan * sizeof(uint16_t));
  _tile_loadd(7, &p_low[0][32], kAmxSpan * sizeof(uint16_t));
  for (int64_t c = 0; c < head; c += 64) add_weighted_values(acc, tile.value_pairs.data(), head, c, c + 64 <= head);
}

// A task's `rows` rows over their positions (tile.from[0] to last_pos) read in place from the paged cache.
inline void amx_attend(Tile& tile, int64_t rows, const uint16_t* key_cache, const uint16_t* value_cache,
                       const int64_t* table, int64_t last_pos, int64_t block_size, int64_t head) {
  configure_attention_tiles(tile);
  for (int64_t base = tile.from[0] / kAmxChunk * kAmxChunk; base <= last_pos; base += kAmxSpan) {
    for (int j = 0; j < kAmxSpan / kAmxChunk; ++j) {
      const int64_t first = base + j * kAmxChunk, block = first / block_size, offset = first % block_size;
      const bool past_end = first > last_pos;
      const uint16_t* keys = past_end ? nullptr : key_cache + table[block] * block_size * head + offset;
      const uint16_t* values = past_end ? nullptr : value_cache + (table[block] * block_size + offset) * head;
      pack_chunk(tile, j, keys, block_size, values, past_end ? 0 : last_pos - first + 1, head);
    }
    for (int64_t row = 0; row < rows; row += kAmxRows) {
      const int n = static_cast<int>(std::min(kAmxRows, rows - row));
      if (base > tile.pos[row + n - 1] || base + kAmxSpan <= tile.from[row]) continue;   // masked for all n rows
      amx_attend_span(tile, row, n, base, head);
    }
  }
}

#undef KVSERVE_LOAD_DOT

}  // namespace kvserve
#endif
