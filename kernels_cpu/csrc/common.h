// What the CPU kernels share: storage-type conversions, a vectorizable exp (scalar and on vectors of N lanes),
// vector types with horizontal max and sum, and dtype dispatch.
// Arithmetic is float32 whatever the storage dtype; results are rounded where the torch references round.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>

// Which linear kernels a build has: the AVX-512 ones where the CPU has those extensions, else the AVX2 ones.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KVSERVE_AVX512_BF16 1
#else
#define KVSERVE_AVX512_BF16 0
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KVSERVE_AVX512_VNNI 1
#else
#define KVSERVE_AVX512_VNNI 0
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVSERVE_AVX2 1
#else
#define KVSERVE_AVX2 0
#endif

namespace kvserve {

// Storage types: float, uint16_t for bfloat16 bits, c10::Half, and an FP8 cache's E4m3 / E5m2 (below). Loads and
// stores convert through float32; the bfloat16 ones are bit operations on plain integers, so that loops over them
// vectorize.
inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t bf16) { return __builtin_bit_cast(float, static_cast<uint32_t>(bf16) << 16); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

// An FP8 KV cache's bytes, float8_e4m3fn and float8_e5m2. Stores round as torch does (from_f32); reads go
// through float16 (decode_fp8 in attention_math.h).
struct E4m3 {
  uint8_t bits;
};
struct E5m2 {
  uint8_t bits;
};

template <typename T>
inline T from_f32(float x) { return static_cast<T>(x); }
template <>   // rounds to nearest even as torch's conversion does; x is already within the type's range
inline E4m3 from_f32(float x) { return {c10::Float8_e4m3fn(x).x}; }
template <>
inline E5m2 from_f32(float x) { return {c10::Float8_e5m2(x).x}; }
template <>
inline uint16_t from_f32(float x) {   // round to nearest even, as torch does
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

template <typename T>
inline float round_to(float x) { return to_f32(from_f32<T>(x)); }

// 2^f on [0, 1), a degree-6 polynomial (relative error ~2e-7); F is float or a vector of floats.
template <typename F>
inline F exp2_fraction(F f) {
  constexpr float c[] = {1.5353362e-4f, 1.3398874e-3f, 9.6184374e-3f, 5.5503325e-2f, 2.4022648e-1f, 6.9314720e-1f, 1.f};
  F p = f * c[0] + c[1];
  for (int i = 2; i < 7; ++i) p = p * f + c[i];
  return p;
}

// exp(x) as 2^i * 2^f: unlike std::exp it vectorizes.
inline float fast_exp(float x) {
  const float t = (x < -87.f ? -87.f : (x > 88.f ? 88.f : x)) * 1.44269504f;
  const float whole = floorf(t);
  return exp2_fraction(t - whole) * __builtin_bit_cast(float, (static_cast<int32_t>(whole) + 127) << 23);
}

// N floats as one value, in vector registers on any target (GCC/Clang vector extensions; an alias template
// would drop the attribute, a member typedef keeps it).
template <typename E, int N>
struct VectorOf {
  typedef E type __attribute__((vector_size(N * sizeof(E))));
};
template <int N>
using Floats = typename VectorOf<float, N>::type;

template <int N>
inline Floats<N> load(const float* from) {
  Floats<N> v;
  std::memcpy(&v, from, sizeof(v));
  return v;
}

template <int N>
inline Floats<N> load(const uint16_t* from) {   // bfloat16 bits: the high half of a float32
  typename VectorOf<uint16_t, N>::type bits;
  std::memcpy(&bits, from, sizeof(bits));
  const auto w = __builtin_convertvector(bits, typename VectorOf<uint32_t, N>::type) << 16;
  Floats<N> v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}

template <typename V>
inline void store(float* to, const V& v) { std::memcpy(to, &v, sizeof(v)); }

template <int N>
using Ints = typename VectorOf<int32_t, N>::type;

template <int N>
inline Floats<N> splat(float x) { return Floats<N>{} + x; }

// fast_exp on N lanes at once, the same arithmetic (floor as truncation corrected below zero).
template <int N>
inline Floats<N> fast_exp(Floats<N> x) {
  x = x < -87.f ? splat<N>(-87.f) : x;
  x = x > 88.f ? splat<N>(88.f) : x;
  const Floats<N> t = x * 1.44269504f;
  Ints<N> whole = __builtin_convertvector(t, Ints<N>);
  whole += t < __builtin_convertvector(whole, Floats<N>);   // comparisons give -1 where true
  const Ints<N> bits = (whole + 127) << 23;
  Floats<N> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return exp2_fraction(t - __builtin_convertvector(whole, Floats<N>)) * scale;
}

// Horizontal max and sum, combining halves.
template <int N, class Combine>
inline float reduce(Floats<N> v, Combine combine) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    Floats<N / 2> low, high;
    std::memcpy(&low, &v, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
    return reduce<N / 2>(combine(low, high), combine);
  }
}

template <int N>
inline float max_of(Floats<N> v) { return reduce<N>(v, [](auto a, auto b) { return a > b ? a : b; }); }

template <int N>
inline float sum_of(Floats<N> v) { return reduce<N>(v, [](auto a, auto b) { return a + b; }); }

template <typename S>
S* ptr(const at::Tensor& t) { return static_cast<S*>(t.data_ptr()); }

// Calls body(S{}) with S the storage type of `type`: float, uint16_t (bfloat16 bits) or c10::Half.
template <typename Body>
void dispatch(at::ScalarType type, const char* name, Body&& body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(uint16_t{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, name, ": dtype ", type, " is not float32, bfloat16 or float16");
  }
}

}  // namespace kvserve
