// Step timers' counters and their bindings (step_timers_enable / _reset / _read).
#include "step_timers.h"

#include <torch/extension.h>

#include <array>

namespace protoserve {

std::atomic<bool> g_step_timers_on{false};

namespace {

constexpr int kRegions = static_cast<int>(StepRegion::kCount);

// StepRegion's order; the names step_timers_read reports.
constexpr std::array<const char*, kRegions> kRegionNames = {
    "qkv",     "attention", "o",       "gate_up", "activation", "down",     "norms",
    "rotary",  "router",    "experts", "lora",    "residual",   "linear"};

std::array<std::atomic<int64_t>, kRegions> g_nanoseconds{};
std::array<std::atomic<int64_t>, kRegions> g_calls{};

void reset() {
  for (int i = 0; i < kRegions; ++i) {
    g_nanoseconds[i].store(0, std::memory_order_relaxed);
    g_calls[i].store(0, std::memory_order_relaxed);
  }
}

// {region: (nanoseconds, calls)} for every region, zeros included.
pybind11::dict read() {
  pybind11::dict out;
  for (int i = 0; i < kRegions; ++i) {
    out[kRegionNames[i]] = pybind11::make_tuple(g_nanoseconds[i].load(std::memory_order_relaxed),
                                                g_calls[i].load(std::memory_order_relaxed));
  }
  return out;
}

}  // namespace

void step_timer_add(StepRegion region, int64_t nanoseconds) {
  const int i = static_cast<int>(region);
  g_nanoseconds[i].fetch_add(nanoseconds, std::memory_order_relaxed);
  g_calls[i].fetch_add(1, std::memory_order_relaxed);
}

void register_step_timer_ops(pybind11::module_& m) {
  m.def("step_timers_enable",
        [](bool on) { g_step_timers_on.store(on, std::memory_order_relaxed); }, pybind11::arg("on"),
        "Turn the native step timers on or off (off by default).");
  m.def("step_timers_reset", &reset, "Zero every region's nanoseconds and calls.");
  m.def("step_timers_read", &read, "{region: (nanoseconds, calls)} since the last reset.");
}

}  // namespace protoserve
