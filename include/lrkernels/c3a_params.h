// Plain parameter structs between the torch binding (csrc/c3a) and the C³A kernels (c3a.cuh).
// No torch types: pointers, sizes and scalars only. Spectra are complex fp32 stored
// interleaved (re, im), row-major and contiguous.
//
// Notation (the c3a ops): x (T, in) viewed as (T, Q, b) blocks, K = kernel (P, Q, b) with
// P = out / b, Q = in / b, F = b / 2 + 1 frequencies, s = scale, ^ = one-sided real FFT.
//   forward      Y[t, p, f]  = s · Σ_q x̂[t, q, f] · conj(K̂[p, q, f])   (+ b̂[p, f])   y = irfft(Y)
//   input grad   DX[t, q, f] = s · Σ_p dŷ[t, p, f] · K̂[p, q, f]                       dx = irfft(DX)
//   kernel grad  DK[p, q, f] = s · Σ_t conj(dŷ[t, p, f]) · x̂[t, q, f]                 dK = irfft(DK)
#pragma once

#include <cstdint>

namespace lrkernels {

// One frequency-domain block contraction: out[t, o, f] = s · Σ_i in[t, i, f] · k(o, i)[f]
// (+ c · bias_fft[o, f]), with k(o, i) = conj(K̂[o, i]) (forward) or K̂[i, o] (input gradient),
// the choice being the kernel's `Transposed` template flag.
struct C3AContractParams {
  const float* in = nullptr;         // (T, n_in, F) complex
  const float* kernel_fft = nullptr; // K̂ (P, Q, F) complex: (n_out, n_in) forward, (n_in, n_out) transposed
  const float* bias_fft = nullptr;   // (n_out, F) complex, or null
  float* out = nullptr;              // (T, n_out, F) complex
  int64_t tokens = 0, n_in = 0, n_out = 0, freqs = 0;
  float scale = 1.0f;       // s, times 1/b when the inverse transform is unnormalised
  float bias_scale = 1.0f;  // c: 1/b likewise
};

// The kernel gradient's spectrum, a reduction over tokens:
//   grad_kernel_fft[p, q, f] += s · Σ_t conj(grad_fft[t, p, f]) · x_fft[t, q, f]
// fp32, zero-initialised by the caller, accumulated with atomics over token chunks.
struct C3AKernelGradParams {
  const float* grad_fft = nullptr;   // dŷ (T, P, F) complex
  const float* x_fft = nullptr;      // x̂ (T, Q, F) complex
  float* grad_kernel_fft = nullptr;  // (P, Q, F) complex
  int64_t tokens = 0, n_out = 0, n_in = 0, freqs = 0;
  float scale = 1.0f;
};

}  // namespace lrkernels
