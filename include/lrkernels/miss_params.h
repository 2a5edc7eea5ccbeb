// Plain parameter structs between the torch binding (csrc/miss) and the Bone / MiSS kernels
// (miss.cuh). No torch types: pointers, sizes and scalars only; every matrix is row-major with
// the leading dimension given, every adapter value float32.
//
// Notation (the miss ops): x (T, in), W (out, in), r the block size, M the block.
//   balance/mini  M (r, cols), cols = out or mini_r:  W'[o, c] = W[o, c] + M[c mod r, o mod cols]
//                 S[t, k] = Σ_{c ≡ k (mod r)} drop(x)[t, c],  y = x Wᵀ + b + S M
//   bat           M (out/r, r, r):  W'_pq = W_pq + W_pq M_p + M_p,  y = x W'ᵀ + b
// The GEMMs run in cuBLAS over chunks of W' that these kernels build (rows [o0, o0 + rows) ×
// columns [c0, c0 + cols) into a scratch buffer), so W' is never held whole.
#pragma once

#include <cstdint>

#include "lrkernels/common/philox.h"

namespace lrkernels {

// S[t, k] = Σ_j drop(x)[t, j·r + k] (float32), j over the ⌈in/r⌉ chunks, the last one short.
template <typename scalar_t>
struct MissChunkSumParams {
  const scalar_t* x = nullptr;  // (T, in), leading dimension in
  float* s = nullptr;           // (T, r)
  int64_t tokens = 0, in = 0, r = 0;
  DropoutParams dropout;
};

// out[t, c] = drop'[t, c] · g[t, c mod r]: the balance adapter's input gradient.
template <typename scalar_t>
struct MissTileParams {
  const float* g = nullptr;  // (T, r) = dy Mᵀ (M repeated to (r, out) for mini)
  scalar_t* out = nullptr;   // (T, in)
  int64_t tokens = 0, in = 0, r = 0;
  DropoutParams dropout;
};

// buf[i, j] = W'[o0 + i, c0 + j] for i < rows, j < cols, in W's dtype (computed in float32).
template <typename scalar_t>
struct MissBuildParams {
  const scalar_t* w = nullptr;  // W (out, in), leading dimension ldw
  const float* m = nullptr;     // M: (r, cols_m) balance/mini, (out/r, r, r) bat
  scalar_t* buf = nullptr;      // (rows, cols), leading dimension cols
  int64_t ldw = 0, r = 0, cols_m = 0;
  int64_t o0 = 0, rows = 0, c0 = 0, cols = 0;
};

}  // namespace lrkernels
