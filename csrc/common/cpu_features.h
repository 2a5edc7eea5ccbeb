// Which CPU kernels the ops run. Hand-vectorised AVX-512 kernels (the fused LoRA paths and the
// Philox dropout draw) are used where the CPU has AVX-512 F/BW/DQ/VL; everywhere else, and when
// the portable path is forced, the ops run their portable code (ATen/BLAS plus compiler-
// vectorised loops) with the same results up to float rounding (dropout masks bit-identical).
#pragma once

namespace lrkernels {

// AVX-512 F, BW, DQ and VL on this CPU (checked once).
bool cpu_has_avx512();

enum class CpuKernels : int {
  kAuto = 0,      // AVX-512 kernels where present, for the sizes where they pay
  kPortable = 1,  // never the AVX-512 kernels
  kFused = 2,     // AVX-512 kernels at every size where present (tests use it for small shapes)
};

CpuKernels cpu_kernels();
void set_cpu_kernels(CpuKernels mode);

// The AVX-512 kernels may run: the CPU has them and the portable path is not forced.
inline bool use_avx512() { return cpu_kernels() != CpuKernels::kPortable && cpu_has_avx512(); }

}  // namespace lrkernels
