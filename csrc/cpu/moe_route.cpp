// moe_route: a mixture-of-experts layer's routing for its router logits, natively, so a
// decode step's MoE layer needs no torch ops between the router GEMM and the experts kernel
// (at batch 1 softmax, top-k, the division and the casts cost more host time than the
// arithmetic). Both the per-op path (engine/layers/moe.py, bf16 with packed experts) and the
// fused decode layers call it, so their routings are bit-identical.
//
// As transformers' routers: softmax over every expert in fp32, the top_k largest
// probabilities in torch.topk's order, optionally divided by their fp32 sum, then rounded to
// bf16 values unless the weights stay fp32 (Mixtral).
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "cpu_ops.h"

namespace protoserve {

void moe_route(const MoeRouteArgs& a) {
  const int64_t experts = a.num_experts, k = a.top_k;
  using Entry = std::pair<float, int64_t>;
  std::vector<float> probs(experts);
  std::vector<Entry> queue(experts);
  for (int64_t t = 0; t < a.num_tokens; ++t) {
    const bf16_t* logits = a.logits + t * a.logits_stride;
    float max_logit = -INFINITY;
    for (int64_t e = 0; e < experts; ++e) max_logit = std::max(max_logit, bf16_to_float(logits[e]));
    float sum = 0.0f;
    for (int64_t e = 0; e < experts; ++e) {
      probs[e] = std::exp(bf16_to_float(logits[e]) - max_logit);
      sum += probs[e];
    }
    for (int64_t e = 0; e < experts; ++e) probs[e] /= sum;
    // torch.topk's CPU selection (aten TopKImpl.h: partial_sort when k * 64 <= E, else
    // nth_element then a sort of the first k - 1), so tied probabilities pick the same
    // experts in the same order as the reference's router.
    for (int64_t e = 0; e < experts; ++e) queue[e] = {probs[e], e};
    const auto greater = [](const Entry& x, const Entry& y) {
      return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
    };
    if (k * 64 <= experts) {
      std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), greater);
    } else {
      std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), greater);
      std::sort(queue.begin(), queue.begin() + k - 1, greater);
    }
    float* weights = a.weights + t * k;
    int64_t* ids = a.expert_ids + t * k;
    float picked_sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      ids[j] = queue[j].second;
      weights[j] = queue[j].first;
      picked_sum += queue[j].first;
    }
    for (int64_t j = 0; j < k; ++j) {
      if (a.renormalize) weights[j] /= picked_sum;
      if (!a.float32_weights) weights[j] = bf16_to_float(float_to_bf16(weights[j]));
    }
  }
}

}  // namespace protoserve
