// The tiling the linear kernels share. A tile of up to 8 rows and 32 outputs keeps its 16 vectors of sums in
// registers; tasks of one 32-output panel and 256 rows go to the threads, panels varying fastest so that a
// thread's consecutive tasks share rows that stay in L2 while it sweeps the weight. One row reads the weight once
// at memory speed, which is what a decode step of few sequences is bound by.
#pragma once

#include <immintrin.h>
#include <sys/mman.h>

#include "common.h"

namespace kvserve {

constexpr int64_t kOutBlock = 16;     // outputs a vector of sums holds
constexpr int kTileRows = 8;
constexpr int kTileBlocks = 2;
constexpr int64_t kRowGroup = 256;

inline __mmask16 valid_outputs(int64_t first, int64_t n) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(kOutBlock, n - first)) - 1);
}

// A packed weight of 1 MiB or more gets fresh memory on 2 MiB pages where the kernel grants them (transparent
// huge pages in madvise or always mode; else ordinary pages): every decode step streams every weight, and one TLB
// miss per 2 MiB instead of per 4 KiB measured 1.09-1.15x faster one-row decodes over SmolLM2's layers. At most
// half of such a mapping is padding.
inline at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (bytes < kHugePage / 2) return at::empty(sizes, options);
  const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage, mapped = length + kHugePage;
  void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "out of memory for a packed weight of ", bytes, " bytes");
  char* start = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) / kHugePage * kHugePage);
  const size_t before = start - static_cast<char*>(base);
  if (before) munmap(base, before);
  if (mapped - before > length) munmap(start + length, mapped - before - length);
  madvise(start, length, MADV_HUGEPAGE);
  return at::from_blob(start, sizes, [length](void* data) { munmap(data, length); }, options);
}

// [N, K] -> [N / 16, K / group, 16, group]: each 16 outputs' groups of inputs together, N and K padded with zeros
// to whole blocks and groups.
inline at::Tensor pack_blocked(const at::Tensor& weight, int64_t group) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t blocks = (n + kOutBlock - 1) / kOutBlock, groups = (k + group - 1) / group;
  auto padded = at::zeros({blocks * kOutBlock, groups * group}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  auto packed = empty_on_huge_pages({blocks, groups, kOutBlock, group}, weight.options());
  return packed.copy_(padded.view({blocks, kOutBlock, groups, group}).permute({0, 2, 1, 3}));
}

// A kernel's output [rows, n] viewed as x's leading dimensions and n outputs.
inline at::Tensor shaped_like_input(const at::Tensor& out, const at::Tensor& x) {
  auto sizes = x.sizes().vec();
  sizes.back() = out.size(1);
  return out.view(sizes);
}

// What pack_linear_grouped takes on every CPU: levels [out, in] of 4 or 8 bits, in and the group size multiples
// of 16, scales [out, groups].
inline void check_grouped_levels(const at::Tensor& qweight, const at::Tensor& scale, int64_t group_size,
                                 int64_t bits) {
  const int64_t k = qweight.size(1);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && k % 16 == 0 && group_size % 16 == 0 &&
              scale.size(1) == (k + group_size - 1) / group_size && (bits == 4 || bits == 8),
              "pack_linear_grouped takes uint8 levels [out, in] of 4 or 8 bits with in and the group size "
              "multiples of 16");
}

inline bool exact_in(at::ScalarType type, const at::Tensor& values) {
  return values.to(type).to(at::kDouble).equal(values.to(at::kDouble));
}

// A grouped weight's scales and its offsets or zero points (`second`), [n, groups] each, as
// [N / 16, groups, 2, 16]: each block's 16 scales of a group, then its 16 offsets or zeros; float16 where it holds
// them all (half the bytes to stream), else float32.
inline at::Tensor pack_group_scales(const at::Tensor& scale, const at::Tensor& second, int64_t blocks) {
  const int64_t n = scale.size(0), groups = scale.size(1);
  const auto storage = exact_in(at::kHalf, scale) && exact_in(at::kHalf, second) ? at::kHalf : at::kFloat;
  auto both = at::zeros({2, blocks * kOutBlock, groups}, scale.options().dtype(storage));
  both[0].narrow(0, 0, n).copy_(scale);
  both[1].narrow(0, 0, n).copy_(second);
  return both.view({2, blocks, kOutBlock, groups}).permute({1, 3, 0, 2}).contiguous();
}

// A packed weight block holds 64 bytes (one cache line) for each step of a kernel's loop over its inputs. While a
// tile computes, it pulls the panel of the thread's next task into L2, one step in every ``every``, so that the
// weight streams from memory during the arithmetic instead of stalling the next task's first tile.
struct Prefetch {
  const char* panel = nullptr;   // the next task's first block, or nullptr
  int64_t block_bytes = 0;
  int64_t every = 1, next = 0;   // a task's t-th tile takes the steps t, t + every, ...

  template <int B>
  inline void step(int64_t s) {
    if (s != next || panel == nullptr) return;
    for (int b = 0; b < B; ++b) _mm_prefetch(panel + b * block_bytes + s * 64, _MM_HINT_T1);
    next += every;
  }
};

// kernel.tile<R, B>(row, block, prefetch): R rows from ``row`` times B blocks of 16 outputs from ``block``.
template <int B, class Kernel>
void tile_of(const Kernel& kernel, int64_t row, int64_t rows, int64_t block, Prefetch prefetch) {
  switch (rows) {
    case 1: return kernel.template tile<1, B>(row, block, prefetch);
    case 2: return kernel.template tile<2, B>(row, block, prefetch);
    case 3: return kernel.template tile<3, B>(row, block, prefetch);
    case 4: return kernel.template tile<4, B>(row, block, prefetch);
    case 5: return kernel.template tile<5, B>(row, block, prefetch);
    case 6: return kernel.template tile<6, B>(row, block, prefetch);
    case 7: return kernel.template tile<7, B>(row, block, prefetch);
    default: return kernel.template tile<8, B>(row, block, prefetch);
  }
}

// kernel.weight is the packed weight's bytes, kernel.steps its loop's length.
template <class Kernel>
void for_each_tile(const Kernel& kernel, int64_t m, int64_t num_blocks) {
  const int64_t panels = (num_blocks + kTileBlocks - 1) / kTileBlocks, groups = (m + kRowGroup - 1) / kRowGroup;
  const int64_t block_bytes = kernel.steps * 64;
  at::parallel_for(0, panels * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % panels * kTileBlocks, first_row = task / panels * kRowGroup;
      const int64_t last_row = std::min(m, first_row + kRowGroup);
      Prefetch prefetch;
      if (task + 1 < end) {
        prefetch.panel = reinterpret_cast<const char*>(kernel.weight) + (task + 1) % panels * kTileBlocks * block_bytes;
        prefetch.block_bytes = block_bytes;
        prefetch.every = (last_row - first_row + kTileRows - 1) / kTileRows;
      }
      for (int64_t row = first_row, tile = 0; row < last_row; row += kTileRows, ++tile) {
        prefetch.next = tile;
        const int64_t rows = std::min<int64_t>(kTileRows, last_row - row);
        if (num_blocks - block >= 2) tile_of<2>(kernel, row, rows, block, prefetch);
        else tile_of<1>(kernel, row, rows, block, prefetch);
      }
    }
  });
}

}  // namespace kvserve
