// Portability macros for the torch-free kernel layer.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LRK_HOST_DEVICE __host__ __device__ __forceinline__
#define LRK_DEVICE __device__ __forceinline__
#else
#define LRK_HOST_DEVICE inline
#define LRK_DEVICE inline
#endif

// Loop unrolling hint understood by both nvcc and the host compiler.
#if defined(__CUDACC__)
#define LRK_UNROLL _Pragma("unroll")
#else
#define LRK_UNROLL _Pragma("GCC unroll 16")
#endif

// Turns a runtime condition into a compile-time constant for the lambda body
// (the flash-attention BOOL_SWITCH idiom).
#define LRK_BOOL_SWITCH(COND, CONST_NAME, ...)    \
  [&] {                                           \
    if (COND) {                                   \
      constexpr static bool CONST_NAME = true;    \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr static bool CONST_NAME = false;   \
      return __VA_ARGS__();                       \
    }                                             \
  }()

// Picks the rank-chunk width (a template constant) for a LoRA rank r: the smallest of
// 8, 16, 32, 64 that covers r, capped at MAX (a compile-time constant), so a rank-8 adapter
// does not pay for 64 lanes and kernels whose shared memory only fits MAX lanes never
// instantiate wider ones.
#define LRK_RANK_CHUNK_SWITCH(RANK, MAX, CONST_NAME, ...)                     \
  [&] {                                                                       \
    if ((RANK) <= 8) {                                                        \
      constexpr static int CONST_NAME = (8 < (MAX) ? 8 : (MAX));              \
      return __VA_ARGS__();                                                   \
    } else if ((RANK) <= 16) {                                                \
      constexpr static int CONST_NAME = (16 < (MAX) ? 16 : (MAX));            \
      return __VA_ARGS__();                                                   \
    } else if ((RANK) <= 32) {                                                \
      constexpr static int CONST_NAME = (32 < (MAX) ? 32 : (MAX));            \
      return __VA_ARGS__();                                                   \
    } else {                                                                  \
      constexpr static int CONST_NAME = (64 < (MAX) ? 64 : (MAX));            \
      return __VA_ARGS__();                                                   \
    }                                                                         \
  }()
