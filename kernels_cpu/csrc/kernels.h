// The kernels the other sources define, which fused_ops.cpp registers as operators and Python functions.
#pragma once

#include <torch/extension.h>

torch::Tensor paged_attention(const torch::Tensor& query, const torch::Tensor& kv_cache,
                              const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                              const torch::Tensor& query_start_loc, double scale, int64_t window,
                              double value_scale);
void store_kv(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
              const torch::Tensor& slot_mapping, double key_scale, double value_scale);
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                          int64_t n);
torch::Tensor gate_up_bf16(const torch::Tensor& x, const torch::Tensor& packed,
                           const c10::optional<torch::Tensor>& bias, int64_t intermediate);
torch::Tensor pack_linear_bf16(const torch::Tensor& weight);
torch::Tensor pack_gate_up_bf16(const torch::Tensor& weight);
bool linear_bf16_supported();
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& shift,
                          const torch::Tensor& w_scales, const c10::optional<torch::Tensor>& bias);
std::vector<torch::Tensor> pack_linear_int8(const torch::Tensor& qweight);
bool linear_int8_supported();
torch::Tensor linear_grouped(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                             const c10::optional<torch::Tensor>& bias, int64_t n, int64_t group_size,
                             bool zero_points, int64_t bits);
std::vector<torch::Tensor> pack_linear_grouped(const torch::Tensor& qweight, const torch::Tensor& scale,
                                               const torch::Tensor& second, int64_t group_size, int64_t bits);
bool linear_grouped_supported(const std::string& dtype);
torch::Tensor linear_fp8(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                         const c10::optional<torch::Tensor>& bias, int64_t n, int64_t group_size, int64_t input_group,
                         double input_scale);
std::vector<torch::Tensor> pack_linear_fp8(const torch::Tensor& weight, const torch::Tensor& scale,
                                           int64_t group_size);
bool linear_fp8_supported();
void bind_replay(pybind11::module_& m);
