// Which software prefetch lets one core stream bf16 weights fastest at 1 token (decode, batch 1).
//
// A stand-alone loop over the same pair-column panels as csrc/cpu/linear_bf16.cpp (8 panels of
// 16 rows in flight, _mm512_dpbf16_ps per pair), over the bench model's 49 weight matrices
// (200 MB, far beyond L3), with each prefetch variant timed in the same process, in turn:
//   nta    prefetchnta 64 pairs ahead (fills L1 only)
//   t1     prefetcht1 64 pairs ahead (fills L2), what linear_bf16.cpp does
//   none   the hardware prefetchers alone
// Build and run (needs AVX512_BF16):
//   g++ -O3 -march=native -fopenmp benchmarks/native/linear_prefetch.cpp -o /tmp/linear_prefetch
//   OMP_NUM_THREADS=2 /tmp/linear_prefetch
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

namespace {

constexpr int kPanels = 8;

template <int Hint, int Distance>
void gemv(const uint16_t* w, const uint16_t* x, float* out, int64_t n, int64_t k) {
  const int64_t pairs = k / 2, groups = n / 16 / kPanels, panel_stride = pairs * 32;
#pragma omp parallel for schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kPanels];
    const uint16_t* panels[kPanels];
    for (int p = 0; p < kPanels; ++p) {
      acc[p] = _mm512_setzero_ps();
      panels[p] = w + (g * kPanels + p) * panel_stride;
    }
    const int32_t* x_pairs = reinterpret_cast<const int32_t*>(x);
    for (int64_t k2 = 0; k2 < pairs; ++k2) {
      const __m512bh xp = (__m512bh)_mm512_set1_epi32(x_pairs[k2]);
      for (int p = 0; p < kPanels; ++p) {
        const uint16_t* v = panels[p] + k2 * 32;
        if (Distance > 0) _mm_prefetch(reinterpret_cast<const char*>(v + Distance * 32), (_mm_hint)Hint);
        acc[p] = _mm512_dpbf16_ps(acc[p], (__m512bh)_mm512_loadu_si512(v), xp);
      }
    }
    for (int p = 0; p < kPanels; ++p) _mm512_storeu_ps(out + (g * kPanels + p) * 16, acc[p]);
  }
}

struct Matrix {
  int64_t n, k;
  uint16_t* w;
};

double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename F>
double median_gb_s(F f, const std::vector<Matrix>& mats, const uint16_t* x, float* out, double bytes) {
  std::vector<double> times;
  for (int r = 0; r < 15; ++r) {
    const double start = seconds();
    for (const Matrix& m : mats) f(m.w, x, out, m.n, m.k);
    times.push_back(seconds() - start);
  }
  std::sort(times.begin(), times.end());
  return bytes / times[times.size() / 2] / 1e9;
}

}  // namespace

int main() {
  // The bench model's shapes (hidden 768, intermediate 2048, 12 layers, vocab 32000), the qkv
  // rows rounded up to a multiple of 8 panels.
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (int layer = 0; layer < 12; ++layer) {
    shapes.insert(shapes.end(), {{1280, 768}, {768, 768}, {4096, 768}, {768, 2048}});
  }
  shapes.push_back({32000, 768});
  std::vector<Matrix> mats;
  double bytes = 0;
  for (auto [n, k] : shapes) {
    auto* w = static_cast<uint16_t*>(std::aligned_alloc(64, n * k * 2));
    for (int64_t i = 0; i < n * k; ++i) w[i] = static_cast<uint16_t>(0x3f80 ^ (i & 7));
    mats.push_back({n, k, w});
    bytes += n * k * 2.0;
  }
  auto* x = static_cast<uint16_t*>(std::aligned_alloc(64, 4096 * 2));
  for (int i = 0; i < 4096; ++i) x[i] = 0x3f80;
  auto* out = static_cast<float*>(std::aligned_alloc(64, 32000 * 4));
  std::printf("%.1f MB of weights, %d threads; GB/s (median of 15 passes)\n", bytes / 1e6,
              omp_get_max_threads());
  for (int round = 0; round < 3; ++round) {
    const double nta = median_gb_s(gemv<_MM_HINT_NTA, 64>, mats, x, out, bytes);
    const double t1 = median_gb_s(gemv<_MM_HINT_T1, 64>, mats, x, out, bytes);
    const double none = median_gb_s(gemv<_MM_HINT_T0, 0>, mats, x, out, bytes);
    std::printf("round %d: nta %.1f  t1 %.1f  none %.1f  (t1 / nta %.2fx)\n", round + 1, nta, t1,
                none, t1 / nta);
  }
  return 0;
}
