#include "common/cpu_features.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

namespace lrkernels {

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512: return "avx512";
    case CpuCapability::kAvx2: return "avx2";
    default: return "default";
  }
}

bool cpu_capability_compiled(CpuCapability c) {
  switch (c) {
    case CpuCapability::kAvx512: return LRK_ISA_COMPILED_AVX512 != 0;
    case CpuCapability::kAvx2: return LRK_ISA_COMPILED_AVX2 != 0;
    default: return true;
  }
}

namespace {

CpuCapability detect() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  // at::vec's AVX-512 code needs F, BW, DQ and VL (as PyTorch's own AVX512 capability does).
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (avx512 && cpu_capability_compiled(CpuCapability::kAvx512)) return CpuCapability::kAvx512;
  if (avx2 && cpu_capability_compiled(CpuCapability::kAvx2)) return CpuCapability::kAvx2;
#endif
  return CpuCapability::kDefault;
}

// LRKERNELS_CPU_CAPABILITY, else ATEN_CPU_CAPABILITY: "default", "avx2", "avx512" (any case);
// anything else is ignored, as ATen ignores an unknown value.
CpuCapability from_environment(CpuCapability detected) {
  const char* v = std::getenv("LRKERNELS_CPU_CAPABILITY");
  if (v == nullptr || *v == '\0') v = std::getenv("ATEN_CPU_CAPABILITY");
  if (v == nullptr) return detected;
  std::string s(v);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  CpuCapability want = detected;
  if (s == "default") want = CpuCapability::kDefault;
  else if (s == "avx2") want = CpuCapability::kAvx2;
  else if (s == "avx512") want = CpuCapability::kAvx512;
  return std::min(want, detected);
}

const CpuCapability g_detected = detect();
std::atomic<int> g_capability{static_cast<int>(from_environment(g_detected))};
std::atomic<int> g_mode{static_cast<int>(CpuKernels::kAuto)};

}  // namespace

CpuCapability cpu_capability_detected() { return g_detected; }

CpuCapability cpu_capability() { return static_cast<CpuCapability>(g_capability.load(std::memory_order_relaxed)); }

CpuCapability set_cpu_capability(CpuCapability requested) {
  const CpuCapability c = std::min(requested, g_detected);
  g_capability.store(static_cast<int>(c), std::memory_order_relaxed);
  return c;
}

CpuKernels cpu_kernels() { return static_cast<CpuKernels>(g_mode.load(std::memory_order_relaxed)); }

void set_cpu_kernels(CpuKernels mode) { g_mode.store(static_cast<int>(mode), std::memory_order_relaxed); }

}  // namespace lrkernels
