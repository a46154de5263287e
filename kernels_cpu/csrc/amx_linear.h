// Linear layers on AMX tiles (Sapphire Rapids and later), for calls of many rows: bfloat16 (AMX-BF16) and W8A8
// int8 (AMX-INT8). The AVX512 kernels' packed weights, [N / 16, K / 2, 16, 2] bfloat16 and [N / 16, K / 4, 16, 4]
// int8, are already AMX's B layout: 16 rows of 64 bytes a tile, each row one pair (or quad) of inputs of 16
// outputs. A task multiplies up to 32 rows by two blocks of 16 outputs: two A tiles of rows (64 bytes of inputs
// each), two B tiles of weight, four C tiles of sums (float32, or int32 for int8); the AVX512 kernel's stores then
// finish the outputs.
#pragma once

#include "amx_tiles.h"

#ifdef KVSERVE_AMX
#include <algorithm>
#include <type_traits>

namespace kvserve {

// Calls of fewer rows stay on AVX512: a tile's rows are multiplied whether or not they hold an input row, and one
// or a few rows read the weight at memory speed either way.
constexpr int64_t kAmxMinRows = 16;

// Whether a call of `rows` rows of `input_bytes` bytes runs on tiles.
inline bool runs_on_amx(int64_t rows, int64_t input_bytes) {
  return rows >= kAmxMinRows && input_bytes % kAmxRowBytes == 0 && amx_permitted();
}

// The tile shapes for `rows` (up to 32) rows: loaded where they change, since loading zeroes every tile.
// Tiles 0-3: sums of (row half, block) as 2 * half + block; 4-5: the two halves' rows; 6-7: the two blocks' weights.
inline void configure_tiles(int64_t rows, int64_t& configured_rows) {
  if (rows == configured_rows) return;
  const int64_t upper = std::min(rows, kAmxRows), lower = rows - upper;
  TileConfig config;
  for (int t = 0; t < 8; ++t) {   // a tile of no rows must have no columns either
    config.rows[t] = static_cast<uint8_t>(t >= 6 ? kAmxRows : (t == 4 || t < 2) ? upper : lower);
    config.colsb[t] = config.rows[t] ? kAmxRowBytes : 0;
  }
  _tile_loadconfig(&config);
  configured_rows = rows;
}

// Sums tile C += A x B: bfloat16 pairs into float32, or unsigned by signed bytes into int32.
#define KVSERVE_TILE_DOT(c, a, b)                                            \
  if constexpr (std::is_same<typename Kernel::Element, uint16_t>::value) { \
    _tile_dpbf16ps(c, a, b);                                                \
  } else {                                                                  \
    _tile_dpbusd(c, a, b);                                                  \
  }

// `rows` (up to 32) rows from `row` times `blocks` (1 or 2) blocks of 16 outputs from `block`, into `sums`.
// The kernel's x and weight hold Elements: uint16_t (bfloat16) or uint8_t (W8A8's shifted rows, int8 weights).
template <class Kernel, typename Sum>
void amx_tile(const Kernel& kernel, int64_t row, int64_t rows, int64_t block, int64_t blocks,
              Sum (&sums)[2 * kAmxRows][2 * kOutBlock]) {
  using Element = typename Kernel::Element;
  constexpr int64_t step = kAmxRowBytes / sizeof(Element);   // inputs a step multiplies
  const bool lower = rows > kAmxRows;
  _tile_zero(0);   // only configured tiles may be touched
  if (blocks == 2) _tile_zero(1);
  if (lower) _tile_zero(2);
  if (lower && blocks == 2) _tile_zero(3);
  const int64_t inputs = kernel.inputs(), weight_block = inputs * kOutBlock;
  const Element* weights = reinterpret_cast<const Element*>(kernel.weight) + block * weight_block;
  const Element* first = kernel.x + row * kernel.x_stride;
  const int64_t row_bytes = kernel.x_stride * sizeof(Element);
  for (int64_t k = 0; k < inputs; k += step) {
    _tile_loadd(4, first + k, row_bytes);
    _tile_loadd(6, weights + k * kOutBlock, kAmxRowBytes);
    KVSERVE_TILE_DOT(0, 4, 6);
    if (blocks == 2) {
      _tile_loadd(7, weights + weight_block + k * kOutBlock, kAmxRowBytes);
      KVSERVE_TILE_DOT(1, 4, 7);
    }
    if (lower) {
      _tile_loadd(5, first + kAmxRows * kernel.x_stride + k, row_bytes);
      KVSERVE_TILE_DOT(2, 5, 6);
      if (blocks == 2) KVSERVE_TILE_DOT(3, 5, 7);
    }
  }
  constexpr int64_t stride = 2 * kOutBlock * sizeof(Sum);
  _tile_stored(0, &sums[0][0], stride);
  if (blocks == 2) _tile_stored(1, &sums[0][kOutBlock], stride);
  if (lower) {
    _tile_stored(2, &sums[kAmxRows][0], stride);
    if (blocks == 2) _tile_stored(3, &sums[kAmxRows][kOutBlock], stride);
  }
}

#undef KVSERVE_TILE_DOT

// x @ weight.T for m rows, in tasks of two blocks and up to 256 rows as for_each_tile makes them: a task's two
// blocks stay in cache while it runs its rows 32 at a time. The kernel's store_sums finishes a row's outputs.
template <class Kernel>
void amx_for_each_task(const Kernel& kernel, int64_t m, int64_t num_blocks) {
  using Sum = std::conditional_t<std::is_same<typename Kernel::Element, uint16_t>::value, float, int32_t>;
  const int64_t pairs = (num_blocks + 1) / 2, groups = (m + kRowGroup - 1) / kRowGroup;
  at::parallel_for(0, pairs * groups, 1, [&](int64_t begin, int64_t end) {
    Sum sums[2 * kAmxRows][2 * kOutBlock];
    int64_t configured_rows = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % pairs * 2, blocks = std::min<int64_t>(2, num_blocks - block);
      const int64_t first_row = task / pairs * kRowGroup, last_row = std::min(m, first_row + kRowGroup);
      for (int64_t row = first_row; row < last_row; row += 2 * kAmxRows) {
        const int64_t rows = std::min(2 * kAmxRows, last_row - row);
        configure_tiles(rows, configured_rows);
        amx_tile(kernel, row, rows, block, blocks, sums);
        for (int64_t r = 0; r < rows; ++r) kernel.store_sums(sums[r], row + r, block, blocks);
      }
    }
    _tile_release();
  });
}

}  // namespace kvserve
#endif
