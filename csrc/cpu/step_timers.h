// Step timers: nanoseconds and call counts per named region of a step (qkv, attention, ...),
// read by benchmarks/step_profile.py --native-timers. A fused decode step is one native call,
// so torch.profiler cannot see inside it; these can.
//
// Off by default. Off, a region costs one load and one predictable branch (no clock read),
// so the kernels need no build switch. Regions are timed on the calling thread around whole
// kernels (each kernel parallelises inside), so they do not nest and need no per-thread state.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace protoserve {

enum class StepRegion : int {
  kQkv,
  kAttention,  // KV cache write + paged decode attention (fused), prefill attention (per-op)
  kO,
  kGateUp,
  kActivation,
  kDown,
  kNorms,  // input / post / sandwich norms and per-head q/k norms
  kRotary,
  kRouter,
  kExperts,
  kLoRA,
  kResidual,  // residual adds and Granite's multiplier
  kLinear,    // the per-op linear_bf16 entry point: the LM head in a fused decode step
  kCount,
};

extern std::atomic<bool> g_step_timers_on;

void step_timer_add(StepRegion region, int64_t nanoseconds);

// Times its scope into `region` when the timers are on.
class StepTimer {
 public:
  explicit StepTimer(StepRegion region) : region_(region) {
    on_ = g_step_timers_on.load(std::memory_order_relaxed);
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~StepTimer() {
    if (!on_) return;
    const auto elapsed = std::chrono::steady_clock::now() - start_;
    step_timer_add(region_,
                   std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count());
  }
  StepTimer(const StepTimer&) = delete;
  StepTimer& operator=(const StepTimer&) = delete;

 private:
  StepRegion region_;
  bool on_;
  std::chrono::steady_clock::time_point start_{};
};

}  // namespace protoserve
