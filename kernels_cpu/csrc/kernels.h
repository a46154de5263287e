// The kernels the sources define, for the file of each part that registers them as operators: fused_ops.cpp for
// the core's, linear_<kind>.cpp for a linear part (with its AVX2 variant, linear_<kind>_avx2.h, where there is one).
#pragma once

#include <ATen/core/Tensor.h>

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, double scale, int64_t window,
                              double value_scale, double soft_cap);
void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
              const at::Tensor& slot_mapping, double key_scale, double value_scale);
std::string paged_attention_isa();
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                          int64_t n);
at::Tensor gate_up_bf16(const at::Tensor& x, const at::Tensor& packed,
                           const c10::optional<at::Tensor>& bias, int64_t intermediate);
at::Tensor pack_linear_bf16(const at::Tensor& weight);
at::Tensor pack_gate_up_bf16(const at::Tensor& weight);
bool linear_bf16_supported();
std::string linear_bf16_isa();
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& shift,
                          const at::Tensor& w_scales, const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> pack_linear_int8(const at::Tensor& qweight);
bool linear_int8_supported();
std::string linear_int8_isa();
at::Tensor linear_grouped(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias, int64_t n, int64_t group_size,
                             bool zero_points, int64_t bits);
std::vector<at::Tensor> pack_linear_grouped(const at::Tensor& qweight, const at::Tensor& scale,
                                               const at::Tensor& second, int64_t group_size, int64_t bits);
bool linear_grouped_supported(const std::string& dtype);
std::string linear_grouped_isa();
at::Tensor linear_fp8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& bias, int64_t n, int64_t group_size, int64_t input_group,
                         double input_scale);
std::vector<at::Tensor> pack_linear_fp8(const at::Tensor& weight, const at::Tensor& scale,
                                           int64_t group_size);
bool linear_fp8_supported();
std::string linear_fp8_isa();
