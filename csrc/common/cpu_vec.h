// First include of every `*_cpu_vec.cpp` source: the portable vector layer (ATen's
// at::vec::Vectorized) for the instruction set this copy of the source is compiled for.
//
// setup.py compiles each `*_cpu_vec.cpp` once per instruction set, through a generated wrapper
// in the build folder, with
//   DEFAULT: -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT -DLRK_ISA_NS=isa_default
//   AVX2:    -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -DLRK_ISA_NS=isa_avx2 -mavx2 -mfma -mf16c
//   AVX-512: -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -DLRK_ISA_NS=isa_avx512
//            -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c
// so at::vec's code lands in at::vec::<CAPABILITY> and ours in lrkernels::<LRK_ISA_NS>: the
// copies never collide. Only these sources are compiled with the wider instruction sets; the
// ops call them through a kernel table (LRK_DECLARE_VEC_KERNELS in common/cpu_features.h) and
// only when the CPU runs them. Keep these sources free of at::Tensor and ATen ops: raw pointers
// and sizes in, results out (the op files do the ATen work, threading included).
#pragma once

#ifndef LRK_ISA_NS
#error "a *_cpu_vec.cpp source is compiled by setup.py once per instruction set; do not compile it directly"
#endif

// (setup.py also passes -Wno-unknown-pragmas: at::vec's headers carry `#pragma unroll` and clang
// pragmas that GCC does not know, and GCC ignores diagnostic pragmas for those.)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels::LRK_ISA_NS {

using at::vec::Vectorized;

// The capability this copy was compiled for.
#if defined(CPU_CAPABILITY_AVX512)
constexpr CpuCapability kThisCapability = CpuCapability::kAvx512;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr CpuCapability kThisCapability = CpuCapability::kAvx2;
#else
constexpr CpuCapability kThisCapability = CpuCapability::kDefault;
#endif

// An L×L block transposed in registers (L = Vectorized<T>::size()): log2 L rounds of pairing
// vector i with vector i + L/2 by interleave2 (the perfect shuffle) leave column k in vector k.
// (Tile transposes of sparse_lowrank and gqa.)
template <typename T>
inline void transpose_block(Vectorized<T>* v) {
  using V = Vectorized<T>;
  constexpr int L = V::size();
  V t[L];
  for (int step = 1; step < L; step *= 2) {
    for (int i = 0; i < L / 2; ++i) {
      auto pr = at::vec::interleave2(v[i], v[i + L / 2]);
      t[2 * i] = pr.first;
      t[2 * i + 1] = pr.second;
    }
    for (int i = 0; i < L; ++i) v[i] = t[i];
  }
}

// Σ a[0:n]·b[0:n] with four vector accumulators (the SDDMM of sparse_lowrank, the dropout
// complement's backward of dora).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    s0 = at::vec::fmadd(V::loadu(a + j), V::loadu(b + j), s0);
    s1 = at::vec::fmadd(V::loadu(a + j + L), V::loadu(b + j + L), s1);
    s2 = at::vec::fmadd(V::loadu(a + j + 2 * L), V::loadu(b + j + 2 * L), s2);
    s3 = at::vec::fmadd(V::loadu(a + j + 3 * L), V::loadu(b + j + 3 * L), s3);
  }
  for (; j + L <= n; j += L) s0 = at::vec::fmadd(V::loadu(a + j), V::loadu(b + j), s0);
  T acc = at::vec::vec_reduce_all<T>([](const V& u, const V& v) { return u + v; }, (s0 + s1) + (s2 + s3));
  for (; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// Σ a·b0 and Σ a·b1 over [0, n) in one pass over a: two SDDMM entries of one sparse_lowrank
// row share a's loads (1.5 loads per multiply-add instead of dot's 2), with four accumulators.
template <typename T>
inline void dot2(const T* a, const T* b0, const T* b1, int64_t n, T* r0, T* r1) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  V s0(T(0)), s1(T(0)), t0(T(0)), t1(T(0));
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    const V a0 = V::loadu(a + j), a1 = V::loadu(a + j + L);
    s0 = at::vec::fmadd(a0, V::loadu(b0 + j), s0);
    s1 = at::vec::fmadd(a1, V::loadu(b0 + j + L), s1);
    t0 = at::vec::fmadd(a0, V::loadu(b1 + j), t0);
    t1 = at::vec::fmadd(a1, V::loadu(b1 + j + L), t1);
  }
  for (; j + L <= n; j += L) {
    const V a0 = V::loadu(a + j);
    s0 = at::vec::fmadd(a0, V::loadu(b0 + j), s0);
    t0 = at::vec::fmadd(a0, V::loadu(b1 + j), t0);
  }
  const auto add = [](const V& u, const V& v) { return u + v; };
  T x0 = at::vec::vec_reduce_all<T>(add, s0 + s1), x1 = at::vec::vec_reduce_all<T>(add, t0 + t1);
  for (; j < n; ++j) {
    x0 += a[j] * b0[j];
    x1 += a[j] * b1[j];
  }
  *r0 += x0;
  *r1 += x1;
}

}  // namespace lrkernels::LRK_ISA_NS
