// The vectorised inner loops of Bone / MiSS on CPU (miss_cpu_vec.cpp, one copy per instruction
// set): the chunk sum of the balance/mini input, the tiled input gradient, and the rows of the
// adapted weight W + ΔW that the chunked GEMMs consume (built in a cache-sized buffer, never
// for the whole weight). Rows are float or double (bfloat16 rows are converted by the caller).
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels {

struct MissVecKernels {
  // s[k] += Σ_j x[j·r + k] (· mask[j·r + k] when mask is given) for k < r over one row of `in`
  // values: the input cut into chunks of r (the last one short) and the chunks summed.
  void (*chunk_sum_f32)(const float* x, const float* mask, int64_t in, int64_t r, float* s);
  void (*chunk_sum_f64)(const double* x, const double* mask, int64_t in, int64_t r, double* s);
  // out[c] = g[c mod r] (· mask[c] when given), c < in: the adapter's input gradient of one row.
  void (*tile_f32)(const float* g, const float* mask, int64_t in, int64_t r, float* out);
  void (*tile_f64)(const double* g, const double* mask, int64_t in, int64_t r, double* out);
  // out[i] = w[i] + m[(c0 + i) mod r] for i < n: columns [c0, c0 + n) of one row of W + ΔW for
  // balance/mini, w pointing at the row's column c0 of W, m the row's column of M
  // (M[:, o mod mini_r], contiguous, length r).
  void (*row_plus_tile_f32)(const float* w, const float* m, int64_t c0, int64_t n, int64_t r, float* out);
  void (*row_plus_tile_f64)(const double* w, const double* m, int64_t c0, int64_t n, int64_t r, double* out);
  // Row i of output block p of W + ΔW for bat over nq input blocks (w pointing at the first):
  //   out[q·r + j] = w[q·r + j] + mi[j] + Σ_k w[q·r + k] · mp[k·r + j]
  // (W'_pq = W_pq + W_pq M_p + M_p), mp = M_p (r×r, row-major), mi = row i of M_p.
  void (*bat_row_f32)(const float* w, const float* mp, const float* mi, int64_t nq, int64_t r, float* out);
  void (*bat_row_f64)(const double* w, const double* mp, const double* mi, int64_t nq, int64_t r, double* out);
};

LRK_DECLARE_VEC_KERNELS(MissVecKernels, miss_vec_kernels)

inline void miss_chunk_sum(const float* x, const float* mask, int64_t in, int64_t r, float* s) {
  miss_vec_kernels().chunk_sum_f32(x, mask, in, r, s);
}
inline void miss_chunk_sum(const double* x, const double* mask, int64_t in, int64_t r, double* s) {
  miss_vec_kernels().chunk_sum_f64(x, mask, in, r, s);
}
inline void miss_tile(const float* g, const float* mask, int64_t in, int64_t r, float* out) {
  miss_vec_kernels().tile_f32(g, mask, in, r, out);
}
inline void miss_tile(const double* g, const double* mask, int64_t in, int64_t r, double* out) {
  miss_vec_kernels().tile_f64(g, mask, in, r, out);
}
inline void miss_row_plus_tile(const float* w, const float* m, int64_t c0, int64_t n, int64_t r, float* out) {
  miss_vec_kernels().row_plus_tile_f32(w, m, c0, n, r, out);
}
inline void miss_row_plus_tile(const double* w, const double* m, int64_t c0, int64_t n, int64_t r, double* out) {
  miss_vec_kernels().row_plus_tile_f64(w, m, c0, n, r, out);
}
inline void miss_bat_row(const float* w, const float* mp, const float* mi, int64_t nq, int64_t r, float* out) {
  miss_vec_kernels().bat_row_f32(w, mp, mi, nq, r, out);
}
inline void miss_bat_row(const double* w, const double* mp, const double* mi, int64_t nq, int64_t r, double* out) {
  miss_vec_kernels().bat_row_f64(w, mp, mi, nq, r, out);
}

}  // namespace lrkernels
