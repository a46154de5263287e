// Paged attention that reads keys and values in place from the cache, for decodes and prefill chunks alike
// (chunks after cached context, prefix-cache hits and sliding windows included): each task is one sequence's
// kv head and a tile of its queries, attended block by block with an online softmax.
//
// Cache layout per kv head: keys [blocks, head, block_size], each block stored transposed so that one query's
// scores for a block are head_size vector FMAs across the block's positions (no horizontal sums); values
// [blocks, block_size, head]. The cache holds the queries' dtype, or FP8: x / scale, whose key scale the caller
// folds into the softmax scale and whose value scale multiplies the output.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "amx_attention.h"
#include "attention_math.h"

namespace {

using namespace kvserve;

constexpr int64_t kQueryTile = 16;   // queries of one sequence per task: their keys are converted once for all
constexpr int kRowGroup = 4;         // rows whose scores are computed together, sharing each key load

struct Task {
  int64_t seq, kv_head, first_query, num_queries, cost;
};

// Adds CW key positions from `base` to NR rows (from `row`): scores, mask, online softmax, weighted values.
// `keys` holds CW positions of each of the head's dimensions, `key_stride` apart; `values` is [CW, head];
// positions from `base + valid` on are past every row's last. They are float32, converted once for many rows,
// or read in place from a float32 or bfloat16 cache. NR and CW are compile-time so that scores and
// accumulators stay in vector registers.
template <typename T, int NR, int CW>
void attend_chunk(Tile& tile, int64_t row, const T* __restrict__ keys, int64_t key_stride,
                  const T* __restrict__ values, int64_t base, int64_t valid, int64_t head) {
  float s[NR][CW], p[NR][CW];
  chunk_scores(s, tile, row, keys, key_stride, head);
  update_softmax(tile, row, NR, s, p, base, head);
  add_weighted_values(tile, row, p, values, valid, head);
}

template <typename T, int CW>
void attend_rows(Tile& tile, int64_t row, int64_t num_rows, const T* keys, int64_t key_stride, const T* values,
                 int64_t base, int64_t valid, int64_t head) {
  switch (num_rows) {
    case 1: return attend_chunk<T, 1, CW>(tile, row, keys, key_stride, values, base, valid, head);
    case 2: return attend_chunk<T, 2, CW>(tile, row, keys, key_stride, values, base, valid, head);
    case 3: return attend_chunk<T, 3, CW>(tile, row, keys, key_stride, values, base, valid, head);
    default: return attend_chunk<T, 4, CW>(tile, row, keys, key_stride, values, base, valid, head);
  }
}

// A task's `rows` rows over the cached positions they attend (tile.from[0] to last_pos), chunk by chunk of CW
// positions (CW divides the block size) on vectors.
template <typename T, typename C, int CW>
void attend_chunks(Tile& tile, int64_t rows, const C* key_cache, const C* value_cache, const int64_t* table,
                   int64_t last_pos, int64_t block_size, int64_t head) {
  for (int64_t base = tile.from[0] / CW * CW; base <= last_pos; base += CW) {
    const int64_t block = base / block_size, offset = base % block_size;
    const C* k_in = key_cache + table[block] * block_size * head + offset;
    const C* v_in = value_cache + (table[block] * block_size + offset) * head;
    // The next block streams into L2 while this one computes (prefetching into L1 instead measured 10-16% slower).
    if (offset == 0 && block + 1 <= last_pos / block_size) {
      const char* next_k = reinterpret_cast<const char*>(key_cache + table[block + 1] * block_size * head);
      const char* next_v = reinterpret_cast<const char*>(value_cache + table[block + 1] * block_size * head);
      for (int64_t b = 0; b < static_cast<int64_t>(block_size * head * sizeof(C)); b += 64) {
        __builtin_prefetch(next_k + b, 0, 1);
        __builtin_prefetch(next_v + b, 0, 1);
      }
    }
    const int64_t valid = std::min<int64_t>(CW, last_pos - base + 1);
    // One group of rows (a decode) reads a float32 or bfloat16 cache in place.
    if constexpr (std::is_same<T, C>::value && !std::is_same<T, c10::Half>::value) {
      if (rows <= kRowGroup) {
        attend_rows<T, CW>(tile, 0, rows, k_in, block_size, v_in, base, valid, head);
        continue;
      }
    }   // more rows (or an FP8 cache's) share keys and values converted once

    if constexpr (std::is_same<C, E4m3>::value || std::is_same<C, E5m2>::value) {
      for (int64_t d = 0; d < head; ++d) decode_fp8(k_in + d * block_size, tile.keys.data() + d * CW, CW);
      decode_fp8(v_in, tile.values.data(), valid * head);
    } else {
      for (int64_t d = 0; d < head; ++d)
        for (int t = 0; t < CW; ++t) tile.keys[d * CW + t] = to_f32(k_in[d * block_size + t]);
      for (int64_t i = 0; i < valid * head; ++i) tile.values[i] = to_f32(v_in[i]);
    }
    for (int64_t row = 0; row < rows; row += kRowGroup) {
      const int64_t n = std::min<int64_t>(kRowGroup, rows - row);
      if (base > tile.pos[row + n - 1] || base + CW <= tile.from[row]) continue;   // masked for all n rows
      attend_rows<float, CW>(tile, row, n, tile.keys.data(), CW, tile.values.data(), base, valid, head);
    }
  }
}

// Whether a task of `rows` rows runs on AMX tiles: a bfloat16 cache's, where the CPU has them and the shapes suit.
template <typename T, typename C>
bool on_amx(int64_t rows, int64_t block_size, int64_t head) {
#ifdef KVSERVE_AMX_ATTENTION
  if constexpr (std::is_same<T, uint16_t>::value && std::is_same<C, uint16_t>::value)
    return attention_on_amx(rows, block_size, head);
#endif
  return false;
}

// One task: its queries (already offset to its first query and kv head's first head) over the cached positions
// they attend; T is the queries' storage type, C the cache's.
template <typename T, typename C, int CW>
void attend_tile(Tile& tile, T* out, const T* query, int64_t row_stride, const C* key_cache, const C* value_cache,
                 const int64_t* table, int64_t first_pos, int64_t num_queries, int64_t group, float scale,
                 float value_scale, int64_t window, float soft_cap, int64_t block_size, int64_t head) {
  const int64_t rows = num_queries * group;
  tile.scale = scale;
  tile.soft_cap = soft_cap;
  const bool amx = on_amx<T, C>(rows, block_size, head);
  for (int64_t r = 0; r < rows; ++r) {
    const T* q_in = query + (r / group) * row_stride + (r % group) * head;
    if (!amx)
      for (int64_t d = 0; d < head; ++d) tile.q[r * head + d] = to_f32(q_in[d]) * scale;
    if constexpr (std::is_same<T, uint16_t>::value) {   // pairs of bfloat16 are their bytes, little-endian
      if (head % 2 == 0) std::memcpy(tile.q_pairs.data() + r * head / 2, q_in, head * sizeof(uint16_t));
    }
    for (int64_t d = 0; d < head; ++d) tile.acc[r * head + d] = 0.f;
    tile.top[r] = kMinusInf;
    tile.total[r] = 0.f;
    tile.pos[r] = first_pos + r / group;
    tile.from[r] = window > 0 ? std::max<int64_t>(0, tile.pos[r] - window + 1) : 0;
  }
  const int64_t last_pos = first_pos + num_queries - 1;
  if (!amx) {
    attend_chunks<T, C, CW>(tile, rows, key_cache, value_cache, table, last_pos, block_size, head);
  } else {
#ifdef KVSERVE_AMX_ATTENTION
    if constexpr (std::is_same<C, uint16_t>::value)
      amx_attend(tile, rows, key_cache, value_cache, table, last_pos, block_size, head);
#endif
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + (r / group) * row_stride + (r % group) * head;
    const float inv = value_scale / tile.total[r];
    for (int64_t d = 0; d < head; ++d) o[d] = from_f32<T>(tile.acc[r * head + d] * inv);
  }
}

// Tasks in decreasing cost, taken one at a time by whichever thread is free: prefill tiles near the end of a
// long prompt cost many times a decode, so static slices of the task list would leave a thread idle.
std::vector<Task> plan_tasks(const int64_t* seq_lens, const int64_t* query_start, int64_t num_seqs,
                             int64_t num_kv_heads, int64_t window) {
  std::vector<Task> tasks;
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t num_queries = query_start[seq + 1] - query_start[seq];
    const int64_t first_pos = seq_lens[seq] - num_queries;
    for (int64_t first = 0; first < num_queries; first += kQueryTile) {
      const int64_t n = std::min(kQueryTile, num_queries - first), last = first_pos + first + n - 1;
      const int64_t keys = window > 0 ? std::min(last + 1, window + n - 1) : last + 1;
      for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) tasks.push_back({seq, kv_head, first, n, keys * n});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  return tasks;
}

template <typename T, typename C>
void paged_attention_kernel(T* out, const T* query, const C* key_cache, const C* value_cache,
                            const int64_t* block_tables, const int64_t* seq_lens, const int64_t* query_start,
                            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, float scale, float value_scale,
                            int64_t window, float soft_cap) {
  const int64_t group = num_heads / num_kv_heads, row_stride = num_heads * head_size;
  const int64_t head_stride = num_blocks * block_size * head_size;
  const std::vector<Task> tasks = plan_tasks(seq_lens, query_start, num_seqs, num_kv_heads, window);
  const int64_t chunk = std::min<int64_t>(block_size, 16);
  const auto run = chunk == 16 ? attend_tile<T, C, 16> : chunk == 8 ? attend_tile<T, C, 8> : attend_tile<T, C, 4>;
  std::atomic<int64_t> next{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    const int64_t rows = kQueryTile * group;
    Tile tile{std::vector<float>(rows * head_size), std::vector<float>(rows * head_size), std::vector<float>(rows),
              std::vector<float>(rows), std::vector<float>(chunk * head_size),
              std::vector<float>(chunk * head_size), std::vector<int64_t>(rows), std::vector<int64_t>(rows),
              std::vector<uint32_t>(rows * head_size / 2 + 1), std::vector<uint16_t>(64 * head_size),
              std::vector<uint16_t>(64 * head_size)};
    for (int64_t i = next++; i < num_tasks; i = next++) {
      const Task& task = tasks[i];
      const int64_t token = query_start[task.seq] + task.first_query;
      const int64_t first_pos = seq_lens[task.seq] - (query_start[task.seq + 1] - query_start[task.seq]) +
                                task.first_query;
      const int64_t head_offset = token * row_stride + task.kv_head * group * head_size;
      run(tile, out + head_offset, query + head_offset, row_stride, key_cache + task.kv_head * head_stride,
          value_cache + task.kv_head * head_stride, block_tables + task.seq * max_blocks, first_pos,
          task.num_queries, group, scale, value_scale, window, soft_cap, block_size, head_size);
    }
#ifdef KVSERVE_AMX_ATTENTION
    if (tile.amx_configured) _tile_release();
#endif
  });
}

}  // namespace

// Calls body(C{}) with C the storage type of an FP8 cache, or body(Same{}) for a cache in the queries' dtype.
template <typename Same, typename Body>
void dispatch_cache(at::ScalarType cache_type, Body&& body) {
  switch (cache_type) {
    case at::kFloat8_e4m3fn: return body(E4m3{});
    case at::kFloat8_e5m2: return body(E5m2{});
    default: return body(Same{});
  }
}

bool is_fp8(at::ScalarType type) { return type == at::kFloat8_e4m3fn || type == at::kFloat8_e5m2; }

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, double scale, int64_t window,
                              double value_scale, double soft_cap) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 5 && kv_cache.is_contiguous(), "bad paged_attention shapes");
  const bool fp8 = is_fp8(kv_cache.scalar_type());
  auto q = (fp8 ? query : query.to(kv_cache.scalar_type())).contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto starts = query_start_loc.contiguous();
  auto out = at::empty_like(q);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2), block_size = kv_cache.size(3);
  dispatch(q.scalar_type(), "paged_attention", [&](auto zero) {
    using scalar_t = decltype(zero);
    dispatch_cache<scalar_t>(kv_cache.scalar_type(), [&](auto cache_zero) {
      using cache_t = decltype(cache_zero);
      const cache_t* cache = ptr<cache_t>(kv_cache);
      const float unit = kFp8Unit<cache_t>;   // what decoding an FP8 cache multiplies its values by
      paged_attention_kernel<scalar_t, cache_t>(
          ptr<scalar_t>(out), ptr<scalar_t>(q), cache, cache + kv_cache.stride(0), tables.data_ptr<int64_t>(),
          lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), lens.size(0), q.size(1), num_kv_heads, q.size(2),
          num_blocks, block_size, tables.size(1), static_cast<float>(scale) / unit,
          static_cast<float>(value_scale) / unit, window, static_cast<float>(soft_cap));
    });
  });
  return out.to(query.scalar_type());
}

// Writes each token's [kv_heads, head] key and value into its slot (block * block_size + offset) of the cache,
// keys transposed within their block; an FP8 cache holds x / scale, saturated at the type's largest value.
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
              const at::Tensor& slot_mapping, double key_scale, double value_scale) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && kv_cache.dim() == 5 && kv_cache.is_contiguous(),
              "bad store_kv shapes");
  const bool fp8 = is_fp8(kv_cache.scalar_type());
  auto k = fp8 ? key : key.to(kv_cache.scalar_type());
  auto v = fp8 ? value : value.to(kv_cache.scalar_type());
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "store_kv takes keys and values with a contiguous head");
  auto slots = slot_mapping.contiguous();
  const int64_t num_kv_heads = k.size(1), head = k.size(2), num_blocks = kv_cache.size(2), bs = kv_cache.size(3);
  const float top = fp8 ? static_cast<float>(kv_cache.scalar_type() == at::kFloat8_e4m3fn
                                                 ? std::numeric_limits<c10::Float8_e4m3fn>::max()
                                                 : std::numeric_limits<c10::Float8_e5m2>::max()) : 0.f;
  dispatch(k.scalar_type(), "store_kv", [&](auto zero) {
    using scalar_t = decltype(zero);
    dispatch_cache<scalar_t>(kv_cache.scalar_type(), [&](auto cache_zero) {
      using cache_t = decltype(cache_zero);
      // The same type is copied as it is; into FP8, divided by the scale and saturated.
      const auto convert = [&](scalar_t x, float inverse_scale) -> cache_t {
        if constexpr (std::is_same<scalar_t, cache_t>::value) {
          return x;
        } else {
          return from_f32<cache_t>(std::clamp(to_f32(x) * inverse_scale, -top, top));
        }
      };
      const float inverse_key = static_cast<float>(1. / key_scale);
      const float inverse_value = static_cast<float>(1. / value_scale);
      cache_t* keys = ptr<cache_t>(kv_cache);
      cache_t* values = keys + kv_cache.stride(0);
      const scalar_t* k_in = ptr<scalar_t>(k);
      const scalar_t* v_in = ptr<scalar_t>(v);
      const int64_t* slot = slots.data_ptr<int64_t>();
      at::parallel_for(0, k.size(0), 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t block = slot[i] / bs, offset = slot[i] % bs;
          for (int64_t h = 0; h < num_kv_heads; ++h) {
            const scalar_t* kr = k_in + i * k.stride(0) + h * k.stride(1);
            const scalar_t* vr = v_in + i * v.stride(0) + h * v.stride(1);
            cache_t* kb = keys + (h * num_blocks + block) * bs * head;
            cache_t* vb = values + ((h * num_blocks + block) * bs + offset) * head;
            for (int64_t d = 0; d < head; ++d) kb[d * bs + offset] = convert(kr[d], inverse_key);
            for (int64_t d = 0; d < head; ++d) vb[d] = convert(vr[d], inverse_value);
          }
        }
      });
    });
  });
}

std::string paged_attention_isa() {   // how a bfloat16 cache's scores and values are multiplied
#ifdef KVSERVE_AMX_ATTENTION
  if (amx_permitted()) return "AMX-BF16 for prefill chunks, AVX512-BF16 for decodes";
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return "AVX512-BF16";
#else
  return "float32 vectors";
#endif
}
