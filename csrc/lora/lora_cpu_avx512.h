// Hand-vectorised AVX-512 kernels for the rank-r side of lora_linear on CPU (float32).
//
// They work on a block of rows that the caller has just touched (or is about to touch) with
// the base GEMM, so x, y, dy and dx are read from cache rather than memory, and every rank-r
// product is a run of 16-wide FMAs with the rank (or 16 columns) in the vector lanes. Dropout
// keep bits are drawn per row inside the kernels (Philox, bit-identical to every other path).
//
// Activations (x, y, dy, dx) are float32 or bfloat16, the latter passed as its raw bits
// (uint16_t, the layout of c10::BFloat16); arithmetic is float32 throughout, bfloat16 results
// are rounded to nearest even. Everything else (A, B, h, dA, …) is float32.
// Layouts are row-major with explicit leading dimensions. `rp` is the rank rounded up to a
// multiple of 16; operands documented as (…, rp) are zero-padded past r.
// Call only when use_avx512() (common/cpu_features.h) is true.
#pragma once

#include <cstdint>

namespace lrkernels::lora_avx512 {

struct RowDropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // 0: no dropout
  float keep_scale = 1.0f;
};

inline int64_t round_up16(int64_t r) { return (r + 15) / 16 * 16; }

// Scratch a thread needs for shrink (floats; for bfloat16 input or dropout) and for the keep
// bits of shrink / grad_in with dropout (uint32).
int64_t scratch_floats(int64_t cols);
int64_t scratch_bits(int64_t cols);

// h[t, :r] = Σ_k drop(x)[t, k] · at[k, :r] for t in [0, rows), drop(x) = keep_scale · m ⊙ x with
// the mask of global rows row0 + t. x (rows, cols) with leading dim ldx; at (cols, rp); h with
// leading dim ldh (r columns written).
void shrink(const float* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
            float* h, int64_t ldh, const RowDropout& d, float* scratch, uint32_t* bits);
void shrink(const uint16_t* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* at, int64_t r,
            float* h, int64_t ldh, const RowDropout& d, float* scratch, uint32_t* bits);

// y[t, :n] += Σ_j h[t, j] · bt[j, :n]. y (rows, n) leading dim ldy; h leading dim ldh; bt (r, n).
void expand_acc(float* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                const float* bt);
void expand_acc(uint16_t* y, int64_t ldy, int64_t rows, int64_t n, const float* h, int64_t ldh, int64_t r,
                const float* bt);

// One pass over dy (rows, n), leading dim ldy:
//   dh[t, :rp] = Σ_o dy[t, o] · beff[o, :rp]   (when dh; beff (n, rp); dh (rows, rp) overwritten)
//   p[o, :rp] += Σ_t dy[t, o] · hg[t, :rp]     (when p;  hg (rows, rp); p (n, rp) accumulated)
void grad_out(const float* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
              const float* hg, float* dh, float* p);
void grad_out(const uint16_t* dy, int64_t ldy, int64_t rows, int64_t n, int64_t rp, const float* beff,
              const float* hg, float* dh, float* p);

// One pass over x (rows, cols), leading dim ldx, with the mask of global rows row0 + t:
//   da[j, :] += Σ_t du[t, j] · drop(x)[t, :]              (when da; da (r, cols))
//   dx[t, :] += keep_scale · m ⊙ Σ_j du[t, j] · a[j, :]   (when dx; leading dim lddx)
// du (rows, r) leading dim ldu; a (r, cols).
void grad_in(const float* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du, int64_t ldu,
             int64_t r, const float* a, float* da, float* dx, int64_t lddx, const RowDropout& d, uint32_t* bits);
void grad_in(const uint16_t* x, int64_t ldx, int64_t row0, int64_t rows, int64_t cols, const float* du,
             int64_t ldu, int64_t r, const float* a, float* da, uint16_t* dx, int64_t lddx, const RowDropout& d,
             uint32_t* bits);

}  // namespace lrkernels::lora_avx512
