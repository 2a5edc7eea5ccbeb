// AVX-512 intrinsics for the hand-vectorised CPU kernels. Functions that use them sit between
//   LRK_AVX512_BEGIN ... LRK_AVX512_END
// (compiled for AVX-512 F/BW/DQ/VL whatever the build's -march) and may only be called when
// use_avx512() (common/cpu_features.h) is true. LRK_HAVE_AVX512_SOURCES is 0 where the compiler
// cannot build them (non-x86 or non-GCC-compatible), and the callers then keep to portable code.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define LRK_HAVE_AVX512_SOURCES 1
// GCC 12's own intrinsic headers trip -Wuninitialized (_mm512_undefined_* initialises a value
// from itself); the warning is about the header, not about our code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
// The same warning fires again where the intrinsics are inlined, so the kernels' region
// silences it too.
#define LRK_AVX512_BEGIN                                                                      \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,fma\")") \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define LRK_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#else
#define LRK_HAVE_AVX512_SOURCES 0
#endif
