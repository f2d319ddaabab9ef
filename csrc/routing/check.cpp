// router_topk validation: every message in one place (see check.h).
#include "routing/check.h"

#include <c10/util/Exception.h>

#include <cmath>

#include "core/error_record.h"

namespace mixops {
namespace {

// `op` names the op in every message: router_topk, or router_topk_backward for the checks the
// backward shares.
ScoreFn parse_score_fn(c10::string_view s, const char* op) {
  if (s == "softmax") return ScoreFn::kSoftmax;
  if (s == "sigmoid") return ScoreFn::kSigmoid;
  if (s == "none") return ScoreFn::kNone;
  if (s == "relu") return ScoreFn::kRelu;
  TORCH_CHECK(false, op, ": score_fn must be 'softmax', 'sigmoid', 'none' or 'relu', got '",
              std::string(s), "'");
}

Rule parse_rule(c10::string_view s) {
  if (s == "topk") return Rule::kTopK;
  if (s == "top_p") return Rule::kTopP;
  if (s == "cum_threshold") return Rule::kCumThreshold;
  TORCH_CHECK(false, "router_topk: rule must be 'topk', 'top_p' or 'cum_threshold', got '",
              std::string(s), "'");
}

// The rule's options and what it combines with: renormalize, renorm_eps, scaling, modality and
// token_mask do; top-k-then-score, a selection bias and group-limited selection do not (the
// authors' rules compare the scores in score order, unbiased, over all experts).
void check_rule(RouterOptions& o, c10::string_view rule, double threshold) {
  o.rule = parse_rule(rule);
  if (o.score_fn == ScoreFn::kRelu) {
    TORCH_CHECK(o.rule == Rule::kTopK, "router_topk: score_fn 'relu' chooses the experts whose ",
                "logit is > 0 (ReMoE; at most k); it takes no rule, got rule '", std::string(rule),
                "'");
    o.rule = Rule::kPositive;
  }
  if (o.rule == Rule::kTopP || o.rule == Rule::kCumThreshold) {
    TORCH_CHECK(o.score_fn == ScoreFn::kSoftmax, "router_topk: rule '", std::string(rule),
                "' compares cumulative softmax probabilities; score_fn must be 'softmax', got ",
                o.score_fn == ScoreFn::kSigmoid ? "'sigmoid'" : "'none'");
    TORCH_CHECK(std::isfinite(threshold), "router_topk: threshold (the p of rule '",
                std::string(rule), "') must be finite, got ", threshold);
    o.threshold = threshold;
  } else {
    TORCH_CHECK(threshold == 0.0, "router_topk: threshold is the p of rules 'top_p' and ",
                "'cum_threshold'; it must be 0 with rule '", std::string(rule), "', got ",
                threshold);
  }
  if (o.rule == Rule::kTopK) return;
  const char* name = o.rule == Rule::kPositive ? "score_fn 'relu'" : "a top-p rule";
  TORCH_CHECK(!o.topk_then_score, "router_topk: ", name, " cannot be combined with ",
              "topk_then_score=True (the rule reads the scores of the whole row)");
  TORCH_CHECK(!o.has_bias, "router_topk: ", name, " cannot be combined with a selection bias");
  TORCH_CHECK(o.num_groups == 1, "router_topk: ", name,
              " cannot be combined with group-limited selection (num_groups = ", o.num_groups, ")");
}

GroupScore parse_group_score(c10::string_view s) {
  if (s == "top2_sum") return GroupScore::kTop2Sum;
  if (s == "max") return GroupScore::kMax;
  TORCH_CHECK(false, "router_topk: group_score must be 'top2_sum' or 'max', got '", std::string(s),
              "'");
}

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [num_tokens, num_experts], got shape ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": logits must be float32, bfloat16 or float16 (or float64, for gradcheck), got ",
              dt);
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have num_experts >= 1 columns, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) <= INT32_MAX, op,
              ": logits must have num_experts <= 2^31 - 1 "
              "columns (int32 expert ids), got shape ",
              logits.sizes());
}

// modality, num_modalities and token_mask, shared by forward and backward.
void check_token_args(const at::Tensor& logits, const std::optional<at::Tensor>& modality,
                      int64_t num_modalities, const std::optional<at::Tensor>& token_mask,
                      const char* op) {
  const int64_t t = logits.size(0), e = logits.size(1);
  TORCH_CHECK(num_modalities >= 1, op, ": num_modalities must be >= 1, got ", num_modalities);
  TORCH_CHECK(e % num_modalities == 0, op, ": num_modalities (", num_modalities,
              ") must divide num_experts (", e, ")");
  TORCH_CHECK(modality.has_value() == (num_modalities > 1), op, ": modality [num_tokens] ",
              "must be given exactly when num_modalities > 1 (num_modalities = ", num_modalities,
              ", modality ", modality.has_value() ? "given" : "missing", ")");
  if (modality) {
    TORCH_CHECK(modality->scalar_type() == at::kInt || modality->scalar_type() == at::kLong, op,
                ": modality must be int32 or int64, got ", modality->scalar_type());
    TORCH_CHECK(modality->dim() == 1 && modality->size(0) == t, op,
                ": modality must have "
                "shape [num_tokens] = [",
                t, "], got ", modality->sizes());
    TORCH_CHECK(modality->device() == logits.device(), op,
                ": modality must be on the same "
                "device as logits (",
                logits.device(), "), got ", modality->device());
  }
  if (token_mask) {
    TORCH_CHECK(token_mask->scalar_type() == at::kBool, op, ": token_mask must be bool, got ",
                token_mask->scalar_type());
    TORCH_CHECK(token_mask->dim() == 1 && token_mask->size(0) == t, op,
                ": token_mask "
                "must have shape [num_tokens] = [",
                t, "], got ", token_mask->sizes());
    TORCH_CHECK(token_mask->device() == logits.device(), op,
                ": token_mask must be on the "
                "same device as logits (",
                logits.device(), "), got ", token_mask->device());
  }
}

// k_name: "k" (forward), "k = ids.size(1)" (backward).
RouterOptions common_options(const at::Tensor& logits, int64_t k, c10::string_view score_fn,
                             bool topk_then_score, bool renormalize, double renorm_eps,
                             double scaling, int64_t num_modalities, const char* op,
                             const char* k_name) {
  RouterOptions o;
  o.num_experts = static_cast<int32_t>(logits.size(1));
  o.score_fn = parse_score_fn(score_fn, op);
  TORCH_CHECK(!(o.score_fn == ScoreFn::kRelu && topk_then_score), op,
              ": score_fn 'relu' cannot be combined with topk_then_score=True (the kept experts ",
              "are those whose logit is > 0)");
  o.topk_then_score = topk_then_score;
  o.renormalize = renormalize;
  TORCH_CHECK(std::isfinite(renorm_eps) && renorm_eps >= 0, op,
              ": renorm_eps must be a finite "
              "number >= 0, got ",
              renorm_eps);
  TORCH_CHECK(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  o.renorm_eps = renorm_eps;
  o.scaling = scaling;
  o.num_modalities = static_cast<int32_t>(num_modalities);
  const int64_t eligible = o.num_experts / num_modalities;
  TORCH_CHECK(k >= 1 && k <= eligible, op, ": ", k_name, " must be in [1, ", eligible, "] (",
              num_modalities > 1 ? "experts per modality" : "num_experts", "), got ", k_name, " = ",
              k);
  o.k = static_cast<int32_t>(k);
  return o;
}

}  // namespace

at::ScalarType router_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

RouterOptions router_check(const at::Tensor& logits, int64_t k, c10::string_view score_fn,
                           bool topk_then_score, bool renormalize, double renorm_eps,
                           double scaling, const std::optional<at::Tensor>& bias,
                           int64_t num_groups, int64_t groups_kept, c10::string_view group_score,
                           const std::optional<at::Tensor>& modality, int64_t num_modalities,
                           const std::optional<at::Tensor>& token_mask, c10::string_view rule,
                           double threshold) {
  const char* op = "router_topk";
  check_logits(logits, op);
  check_token_args(logits, modality, num_modalities, token_mask, op);
  RouterOptions o = common_options(logits, k, score_fn, topk_then_score, renormalize, renorm_eps,
                                   scaling, num_modalities, op, "k");
  const int64_t e = o.num_experts;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == e,
                "router_topk: bias must have shape "
                "[num_experts] = [",
                e, "], got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()),
                "router_topk: bias must be a floating "
                "point tensor, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == logits.device(),
                "router_topk: bias must be on the same device "
                "as logits (",
                logits.device(), "), got ", bias->device());
    o.has_bias = true;
  }
  TORCH_CHECK(num_groups >= 1, "router_topk: num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(e % num_groups == 0, "router_topk: num_groups (", num_groups,
              ") must divide "
              "num_experts (",
              e, ")");
  TORCH_CHECK(num_groups == 1 || num_modalities == 1,
              "router_topk: group-limited selection "
              "(num_groups = ",
              num_groups,
              ") cannot be combined with modality groups "
              "(num_modalities = ",
              num_modalities, ")");
  TORCH_CHECK(groups_kept >= 1 && groups_kept <= num_groups,
              "router_topk: groups_kept must be "
              "in [1, num_groups = ",
              num_groups, "], got ", groups_kept);
  o.num_groups = static_cast<int32_t>(num_groups);
  o.groups_kept = static_cast<int32_t>(num_groups == 1 ? 1 : groups_kept);
  o.group_score = parse_group_score(group_score);
  if (num_groups > 1) {
    const int64_t eligible = groups_kept * (e / num_groups);
    TORCH_CHECK(k <= eligible, "router_topk: k (", k,
                ") must be <= groups_kept * experts per "
                "group = ",
                groups_kept, " * ", e / num_groups, " = ", eligible);
  }
  check_rule(o, rule, threshold);
  return o;
}

RouterOptions router_backward_check(
    const std::optional<at::Tensor>& grad_weights, const std::optional<at::Tensor>& grad_score_sum,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits, const at::Tensor& ids,
    c10::string_view score_fn, bool topk_then_score, bool renormalize, double renorm_eps,
    double scaling, const std::optional<at::Tensor>& modality, int64_t num_modalities,
    const std::optional<at::Tensor>& token_mask) {
  const char* op = "router_topk_backward";
  check_logits(logits, op);
  check_token_args(logits, modality, num_modalities, token_mask, op);
  const int64_t t = logits.size(0), e = logits.size(1);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == t && ids.scalar_type() == at::kInt,
              "router_topk_backward: ids must be int32 [num_tokens = ", t, ", k], got ",
              ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(ids.device() == logits.device(),
              "router_topk_backward: ids must be on the same "
              "device as logits (",
              logits.device(), "), got ", ids.device());
  RouterOptions o = common_options(logits, ids.size(1), score_fn, topk_then_score, renormalize,
                                   renorm_eps, scaling, num_modalities, op, "k = ids.size(1)");
  const auto acc = router_acc_dtype(logits);
  auto check_grad = [&](const std::optional<at::Tensor>& g, const char* name,
                        std::vector<int64_t> shape) {
    if (!g) return;
    TORCH_CHECK(g->sizes() == at::IntArrayRef(shape), "router_topk_backward: ", name,
                " must have shape ", at::IntArrayRef(shape), ", got ", g->sizes());
    TORCH_CHECK(g->scalar_type() == acc, "router_topk_backward: ", name, " must be ", acc, ", got ",
                g->scalar_type());
    TORCH_CHECK(g->device() == logits.device(), "router_topk_backward: ", name,
                " must be on the same device as logits (", logits.device(), "), got ", g->device());
  };
  check_grad(grad_weights, "grad_weights", {t, ids.size(1)});
  check_grad(grad_score_sum, "grad_score_sum", {e});
  check_grad(grad_lse, "grad_lse", {t});
  return o;
}

void router_check_modality_values(const at::Tensor& modality, int64_t num_modalities) {
  const at::Tensor m = modality.to(at::kLong).contiguous();
  const int64_t* p = m.data_ptr<int64_t>();
  for (int64_t t = 0; t < m.numel(); ++t)
    TORCH_CHECK(p[t] >= 0 && p[t] < num_modalities,
                "router_topk: modality values must be in "
                "[0, num_modalities = ",
                num_modalities, "), got modality[", t, "] = ", p[t]);
}

std::string router_error_message(int32_t bits, int64_t num_modalities) {
  std::string msg = "router_topk: invalid input values:";
  if (bits & kModalityOutOfRange)
    msg += " modality values must be in [0, num_modalities = " + std::to_string(num_modalities) +
           ") (rows with a bad modality were routed as modality 0);";
  if (bits & kIdsNotEligible)
    msg +=
        " router_topk_backward: ids must name eligible experts of their token (from "
        "router_topk with the same options; other ids were ignored);";
  return msg;
}

void select_topc_check(const at::Tensor& scores, int64_t c, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(scores.dim() == 2, "select_topc: scores must be 2-D [batch, n], got shape ",
              scores.sizes());
  const auto dt = scores.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "select_topc: scores must be float32, bfloat16, float16 or float64, got ", dt);
  const int64_t b = scores.size(0), n = scores.size(1);
  TORCH_CHECK(n <= INT32_MAX,
              "select_topc: scores must have n <= 2^31 - 1 columns (int32 positions in the "
              "kernels), got shape ",
              scores.sizes());
  TORCH_CHECK(c >= 0 && c <= n, "select_topc: c must be in [0, n = ", n, "], got c = ", c);
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "select_topc: mask must be bool, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == b && mask->size(1) == n,
                "select_topc: mask must have the shape of scores [batch, n] = [", b, ", ", n,
                "], got ", mask->sizes());
    TORCH_CHECK(mask->device() == scores.device(),
                "select_topc: mask must be on the same device as scores (", scores.device(),
                "), got ", mask->device());
  }
}

// The messages of the router's device error slots (mixops.check_errors, MIXOPS_DEBUG=1);
// context: a = num_modalities.
const bool kRouterMessagesRegistered = [] {
  for (ErrorSlot s : {ErrorSlot::kRouterTopk, ErrorSlot::kRouterTopkBackward}) {
    register_error_message(
        s, [](int32_t bits, const ErrorContext& c) { return router_error_message(bits, c.a); });
  }
  return true;
}();

}  // namespace mixops
