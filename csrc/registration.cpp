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
  // The low-rank Adam step of GaLore (arXiv 2403.03507) and Fira (arXiv 2410.01623), in place
  // on the moments of the projected gradient R (HF-style ε, outside the square root):
  //   m ← β₁m + (1 − β₁)R,  v ← β₂v + (1 − β₂)R²;  returns N = m / (√v + ε).
  // Moments are float32 or bfloat16 (float64 on CPU); N is float32 (float64 for float64 moments).
  // Bias correction is left to the caller (it is a scalar folded into alpha below).
  m.def(
      "galore_adam_moments(Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor grad, float beta1, float beta2, "
      "float eps) -> Tensor");
  // W ← β·W + α·(P N if project_left else N P) [+ γ·(G ⊙ s)], in place, W written once by a
  // GEMM with beta: GaLore's back-projection, scale, step and decoupled weight decay
  // (β = 1 − lr·wd, α = −β·step_size·scale). The optional residual term is Fira's channel-wise
  // scaled full-rank gradient: s of shape (m, 1) scales rows, (1, n) columns; γ = residual_alpha.
  m.def(
      "galore_apply_update(Tensor(a!) weight, Tensor projector, Tensor update, bool project_left, float alpha, "
      "float beta, Tensor? residual_grad=None, Tensor? residual_scale=None, float residual_alpha=0.0) -> ()");

  // ---- c3a ---------------------------------------------------------------------------
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrkernels native library: the ops are registered under torch.ops.lrkernels";
  m.def("build_info", &lrkernels::build_info,
        "What this build contains: CUDA compiled in or not, arch list, torch and CUDA versions.");
}
