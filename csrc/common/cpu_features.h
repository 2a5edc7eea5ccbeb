// Which CPU kernels the ops run: the instruction set of the vectorised kernels, and whether the
// hand-written blocked kernels or the ATen composition run.
//
// Instruction set ("capability", as ATEN_CPU_CAPABILITY names it for PyTorch): every
// `*_cpu_vec.cpp` source is compiled once per instruction set this build targets (DEFAULT
// always; AVX2 and AVX-512 on x86-64; on aarch64 DEFAULT is NEON, the baseline), each copy in
// its own namespace lrkernels::isa_<name> over ATen's at::vec::Vectorized, and the ops pick a
// copy at run time: the best this CPU runs, capped by LRKERNELS_CPU_CAPABILITY (or, when that is
// unset, ATEN_CPU_CAPABILITY), read once when the library loads, or by set_cpu_capability().
//
// Kernel path: "auto" takes the blocked kernels where they pay (the op decides from its shape),
// "aten" never (ATen/BLAS composition only), "blocked" at every size (tests use it for small
// shapes). Every choice computes the same function up to float rounding; dropout masks are
// bit-identical everywhere.
#pragma once

#include <cstdint>

namespace lrkernels {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// "default", "avx2", "avx512".
const char* cpu_capability_name(CpuCapability c);
// The best capability this CPU runs and this build compiled.
CpuCapability cpu_capability_detected();
// The capability in force (detected, capped by the environment or set_cpu_capability).
CpuCapability cpu_capability();
// Requests a capability; it is capped at the detected one. Returns the one now in force.
CpuCapability set_cpu_capability(CpuCapability requested);
// Whether this build compiled the vectorised kernels for `c`.
bool cpu_capability_compiled(CpuCapability c);

enum class CpuKernels : int {
  kAuto = 0,     // the blocked kernels where they pay
  kAten = 1,     // never the blocked kernels
  kBlocked = 2,  // the blocked kernels at every size
};

CpuKernels cpu_kernels();
void set_cpu_kernels(CpuKernels mode);

// The hand-written AVX-512 intrinsics (until they move onto at::vec) may run: AVX-512 is the
// capability in force and the ATen path is not forced.
inline bool use_avx512() {
  return cpu_kernels() != CpuKernels::kAten && cpu_capability() == CpuCapability::kAvx512;
}
// Kept for the bindings: whether this CPU and build run AVX-512 kernels at all.
inline bool cpu_has_avx512() { return cpu_capability_detected() == CpuCapability::kAvx512; }

// Table-of-kernels dispatch. A family declares, in a header shared by its op file and its
// `_cpu_vec.cpp` source,
//     struct FooVecKernels { void (*bar_f32)(const float*, float*, int64_t); ... };
//     LRK_DECLARE_VEC_KERNELS(FooVecKernels, foo_vec_kernels)
// and defines, in foo_cpu_vec.cpp (inside namespace lrkernels::LRK_ISA_NS),
//     const FooVecKernels& foo_vec_kernels() { static const FooVecKernels k{&bar<float>, ...}; return k; }
// The op then calls foo_vec_kernels().bar_f32(...), which runs the copy for the capability in
// force. The LRK_ISA_COMPILED_* macros come from setup.py.
#if LRK_ISA_COMPILED_AVX2
#define LRK_VEC_DECL_AVX2(TABLE, FN) \
  namespace isa_avx2 {               \
  const TABLE& FN();                 \
  }
#define LRK_VEC_CASE_AVX2(FN) \
  case CpuCapability::kAvx2:  \
    return isa_avx2::FN();
#else
#define LRK_VEC_DECL_AVX2(TABLE, FN)
#define LRK_VEC_CASE_AVX2(FN)
#endif
#if LRK_ISA_COMPILED_AVX512
#define LRK_VEC_DECL_AVX512(TABLE, FN) \
  namespace isa_avx512 {               \
  const TABLE& FN();                   \
  }
#define LRK_VEC_CASE_AVX512(FN) \
  case CpuCapability::kAvx512:  \
    return isa_avx512::FN();
#else
#define LRK_VEC_DECL_AVX512(TABLE, FN)
#define LRK_VEC_CASE_AVX512(FN)
#endif

#define LRK_DECLARE_VEC_KERNELS(TABLE, FN)          \
  namespace isa_default {                           \
  const TABLE& FN();                                \
  }                                                 \
  LRK_VEC_DECL_AVX2(TABLE, FN)                      \
  LRK_VEC_DECL_AVX512(TABLE, FN)                    \
  inline const TABLE& FN() {                        \
    switch (::lrkernels::cpu_capability()) {        \
      LRK_VEC_CASE_AVX512(FN)                       \
      LRK_VEC_CASE_AVX2(FN)                         \
      default:                                      \
        return isa_default::FN();                   \
    }                                               \
  }

}  // namespace lrkernels
