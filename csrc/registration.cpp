// The lrkernels op catalogue: every schema of torch.ops.lrkernels, in one place. This block
// is the library's public ABI. Backend kernels live next to their CUDA/C++ code and
// register themselves with TORCH_LIBRARY_IMPL; fakes and autograd are registered in Python
// (python/lrkernels/ops/). Backward passes are ops of their own.
#include <torch/extension.h>
#include <torch/library.h>

#include "common/build_info.h"

TORCH_LIBRARY(lrkernels, m) {
  // ---- common ------------------------------------------------------------------------
  // The inverted-dropout mask the fused ops apply to element (row, col) of a (rows, cols)
  // input: 0 where dropped, 1/(1 - p_eff) where kept (Philox4x32-10, 16-bit draws; see
  // include/lrkernels/common/philox.h). Materialised only for tests and debugging.
  m.def("dropout_mask(Tensor seed, SymInt rows, SymInt cols, float p, ScalarType dtype) -> Tensor");

  // ---- lora_linear -------------------------------------------------------------------
  // y = x Wᵀ + b + s·((g ⊙ (drop(x) Aᵀ)) Bᵀ) ⊙ o — LoRA (arXiv 2106.09685), rsLoRA
  // (s = α/√r, arXiv 2312.03732), VeRA (g = λ_d, o = λ_b, arXiv 2310.11454), rank gates
  // (SoRA, AdaLoRA) and DyLoRA truncation (g a 0/1 mask).
  // Returns (y, hidden) with hidden = drop(x) Aᵀ in float32, shape (..., r): saved for the
  // backward op so it need not re-read x for it.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor? rank_scale, Tensor? out_scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // Gradients of lora_linear for (x, weight, bias, lora_a, lora_b, rank_scale, out_scale);
  // output_mask says which to compute, the others are returned as None. The dropout mask is
  // regenerated from the seed, never stored.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor hidden, float scale, Tensor? rank_scale, Tensor? out_scale, float dropout_p, Tensor? seed, "
      "bool[7] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // ---- multi_lora --------------------------------------------------------------------

  // ---- galore ------------------------------------------------------------------------

  // ---- c3a ---------------------------------------------------------------------------
  // Block-circulant adapter — C³A, "Parameter-Efficient Fine-Tuning via Circular Convolution"
  // (arXiv 2407.19342). kernel K (out/b, in/b, b) defines ΔW[p·b+i, q·b+j] = K[p, q, (j − i) mod b];
  // y = s · x ΔWᵀ, applied through real FFTs: y_p = irfft(Σ_q conj(rfft K_pq) · rfft x_q).
  // Returns (y, kernel_fft) with kernel_fft = rfft(K) (out/b, in/b, b/2+1), complex64
  // (complex128 for float64 inputs): computed once per step, saved for the backward op.
  m.def("c3a(Tensor x, Tensor kernel, float scale) -> (Tensor, Tensor)");
  // Gradients of c3a for (x, kernel): dx_q = s · irfft(Σ_p rfft K_pq · rfft dy_p) (exactly
  // dy ΔW), dK_pq = s · irfft(Σ_t conj(rfft dy_tp) · rfft x_tq). kernel is read for its shape
  // only; its spectrum comes from the forward.
  m.def(
      "c3a_backward(Tensor grad_out, Tensor x, Tensor kernel, Tensor kernel_fft, float scale, bool[2] output_mask) "
      "-> (Tensor?, Tensor?)");
  // y = x Wᵀ + b + s · x ΔWᵀ: the base linear fused in (the adapter and bias are written
  // first, the base GEMM accumulates onto them). Returns (y, kernel_fft) as c3a.
  m.def("c3a_linear(Tensor x, Tensor weight, Tensor? bias, Tensor kernel, float scale) -> (Tensor, Tensor)");
  // Gradients of c3a_linear for (x, weight, bias, kernel); output_mask says which.
  m.def(
      "c3a_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor kernel, Tensor kernel_fft, float scale, "
      "bool[4] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrkernels native library: the ops are registered under torch.ops.lrkernels";
  m.def("build_info", &lrkernels::build_info,
        "What this build contains: CUDA compiled in or not, arch list, torch and CUDA versions.");
}
