// The blocked CPU kernels of the rank-r side of lora_linear (and multi_lora_linear's forward),
// written once over at::vec (lora_cpu_vec.cpp, compiled once per instruction set: see
// common/cpu_vec.h) and picked at run time for the capability in force.
//
// They work on a block of rows the caller has just touched (or is about to touch) with the base
// GEMM, so x, y, dy and dx come from cache, and every rank-r product is a register tile of fused
// multiply-adds (rows × vector lanes). Dropout keep bits are drawn per row inside the kernels
// (Philox, bit-identical to every other path).
//
// Activations (x, y, dy, dx) are float32 or bfloat16; arithmetic is float32 throughout and
// bfloat16 results round to nearest even. Everything else (A, B, h, dA, ...) is float32, row-major
// with explicit leading dimensions. Operands documented "padded" have their row length rounded up
// to a multiple of kLoraVecPad (lora_vec_pad) with zeros past the real columns, so the kernels
// never load a partial vector from them.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "common/cpu_features.h"

namespace lrkernels {

constexpr int64_t kLoraVecPad = 16;
inline int64_t lora_vec_pad(int64_t n) { return (n + kLoraVecPad - 1) / kLoraVecPad * kLoraVecPad; }

struct LoraVecDropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // 0: no dropout
  float keep_scale = 1.0f;
};

// Rows per slab inside the kernels (a slab's converted rows stay in L2).
constexpr int64_t kLoraVecSlab = 32;
// Scratch a thread passes to shrink / grad_out / grad_in: floats and keep-bit words, for rows of
// up to `cols` columns.
inline int64_t lora_vec_scratch_floats(int64_t cols) { return 2 * kLoraVecSlab * lora_vec_pad(cols) + 64; }
inline int64_t lora_vec_scratch_bits(int64_t cols) { return (cols + 7) / 8 + 1; }

template <typename E>
struct LoraVecOps {
  // h[t, :r] = Σ_k drop(x)[t, k] · at[k, :r] for t in [0, rows); drop(x) = keep_scale · m ⊙ x with
  // the mask of global rows row0 + t. x (rows, cols) leading dim ldx; at (cols, rp) padded
  // (rp = lora_vec_pad(r)); h leading dim ldh (r columns written).
  void (*shrink)(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
                 float* h, int64_t ldh, const LoraVecDropout& d, float* scratch, uint32_t* bits);
  // y[t, :n] += Σ_j h[t, j] · bt[j, :n]. y leading dim ldy; h leading dim ldh; bt (r, ldb) padded.
  void (*expand_acc)(E* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                     const float* bt, int64_t ldb);
  // One pass over dy (rows, n), leading dim ldy, rp a multiple of kLoraVecPad:
  //   dh[t, :rp] = Σ_o dy[t, o] · beff[o, :rp]   (when dh; beff (n, rp); dh (rows, rp) overwritten)
  //   p[o, :rp] += Σ_t dy[t, o] · hg[t, :rp]     (when p;  hg (rows, rp); p (n, rp) accumulated)
  void (*grad_out)(const E* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
                   const float* hg, float* dh, float* p, float* scratch);
  // One pass over x (rows, cols), leading dim ldx, with the mask of global rows row0 + t:
  //   da[j, :] += Σ_t du[t, j] · drop(x)[t, :]               (when da; da (r, lda) padded)
  //   dx[t, :] += keep_scale · m ⊙ Σ_j du[t, j] · a[j, :]    (when dx; leading dim lddx)
  // du (rows, r) leading dim ldu; a (r, lda) padded, lda = lora_vec_pad(cols).
  void (*grad_in)(const E* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du,
                  int64_t ldu, int64_t r, const float* a, int64_t lda, float* da, E* dx, int64_t lddx,
                  const LoraVecDropout& d, float* scratch, uint32_t* bits);
};

struct LoraVecKernels {
  LoraVecOps<float> f32;
  LoraVecOps<c10::BFloat16> bf16;
};

LRK_DECLARE_VEC_KERNELS(LoraVecKernels, lora_vec_kernels)

template <typename E>
inline const LoraVecOps<E>& lora_vec_ops() {
  if constexpr (std::is_same_v<E, float>)
    return lora_vec_kernels().f32;
  else
    return lora_vec_kernels().bf16;
}

}  // namespace lrkernels
