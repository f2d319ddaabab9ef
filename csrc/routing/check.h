// router_topk validation shared by the CPU and CUDA op layers: one place for every message, so
// every caller of torch.ops.mixops.router_topk gets the same clear errors naming the argument.
// Values in device memory (modality) are checked here only for CPU tensors; CUDA kernels clamp
// and set an error flag (router_error_message gives its text under MIXOPS_DEBUG=1).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "routing/routing.h"

namespace mixops {

// Validates the forward arguments; returns the kernels' options (has_bias, num_experts, ...).
RouterOptions router_check(const at::Tensor& logits, int64_t k, c10::string_view score_fn,
                           bool topk_then_score, bool renormalize, double renorm_eps,
                           double scaling, const std::optional<at::Tensor>& bias,
                           int64_t num_groups, int64_t groups_kept, c10::string_view group_score,
                           const std::optional<at::Tensor>& modality, int64_t num_modalities,
                           const std::optional<at::Tensor>& token_mask, c10::string_view rule,
                           double threshold);

// Validates the backward arguments (ids [T, k] from the forward); returns the options.
RouterOptions router_backward_check(
    const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_score_sum,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits, const at::Tensor& ids,
    c10::string_view score_fn, bool topk_then_score, bool renormalize, double renorm_eps,
    double scaling, const std::optional<at::Tensor>& modality, int64_t num_modalities,
    const std::optional<at::Tensor>& token_mask);

// The accumulation dtype of the router math for these logits: float64 for float64, else float32.
at::ScalarType router_acc_dtype(const at::Tensor& logits);

// Host check of modality values (CPU tensor) against [0, num_modalities).
void router_check_modality_values(const at::Tensor& modality, int64_t num_modalities);

std::string router_error_message(int32_t bits, int64_t num_modalities);

// select_topc: scores [B, N] floating, 0 <= c <= N, mask [B, N] bool on scores' device.
void select_topc_check(const at::Tensor& scores, int64_t c, const std::optional<at::Tensor>& mask);

}  // namespace mixops
