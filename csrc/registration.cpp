// The lrkernels op catalogue: every schema of torch.ops.lrkernels, in one place. This block
// is the library's public ABI. Backend kernels live next to their CUDA/C++ code and
// register themselves with TORCH_LIBRARY_IMPL; fakes and autograd are registered in Python
// (python/lrkernels/ops/). Backward passes are ops of their own.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/build_info.h"
#include "common/cpu_features.h"
#include "common/cuda_kernels.h"

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
  // Multi-LoRA: token t uses adapter a_t (−1: base model only) with its own rank r_a ≤ r_max,
  //   y_t = x_t Wᵀ + b + s[a_t] · (x_t A[a_t, :r]ᵀ) B[a_t, :, :r]ᵀ
  // — batched LoRA (FLoRA, arXiv 2312.05677), Punica SGMV/BGMV (arXiv 2310.18547), S-LoRA
  // (arXiv 2311.03285). Tokens are grouped by adapter once per batch (multi_lora_segments) and
  // the grouping is reused by every layer. Adapter ids outside [−1, L) are an error on CPU; on
  // CUDA (no host sync) they are treated as −1 (base only), ranks are clamped to [0, r_max].

  // Grouping metadata: token_order (T,) int32 lists the tokens sorted (stably) by adapter,
  // tokens of adapter l at token_order[adapter_offsets[l] : adapter_offsets[l + 1]];
  // adapter_offsets (L + 1,) int32; base-only tokens come after adapter_offsets[L].
  // token_order must be a permutation of [0, T) and the grouping must come from the same
  // adapter_ids: the ops follow the grouping. On CPU a token_order that is not a permutation is
  // a ValueError; on CUDA it is not checked (no host sync) and the rows of tokens listed twice
  // or missing are undefined.
  m.def("multi_lora_segments(Tensor adapter_ids, int num_adapters) -> (Tensor, Tensor)");
  // Shrink (SGMV/BGMV "shrink"): hidden[s, t, :r_a] = x_t A[s, a_t, :r_a]ᵀ in float32 (float64 for
  // float64 x), zero elsewhere. lora_a (L, r_max, in) -> hidden (T, r_max), or (S, L, r_max, in)
  // for S output slices (fused QKV / gate-up) -> hidden (S, T, r_max): x is read once.
  m.def(
      "lora_shrink(Tensor x, Tensor lora_a, Tensor adapter_ids, Tensor token_order, Tensor adapter_offsets, "
      "Tensor? ranks) -> Tensor");
  // Expand, in place: y[t, cols of slice s] += scales[a_t] · hidden[s, t, :r_a] B[a_t, cols, :r_a]ᵀ.
  // lora_b (L, out_total, r_max) stacks the slices' B along the output dimension; slice_sizes
  // (None: one slice, or equal slices) says how many output columns each hidden slice feeds.
  m.def(
      "lora_expand_(Tensor(a!) y, Tensor hidden, Tensor lora_b, Tensor adapter_ids, Tensor token_order, "
      "Tensor adapter_offsets, Tensor scales, Tensor? ranks, int[]? slice_sizes) -> ()");
  // The fused layer with lora_linear's options, per adapter a = a_t:
  //   y_t = x_t Wᵀ + b + s[a] · ((g[a] ⊙ (drop(x_t) A[a, :r]ᵀ)) B[a, :, :r]ᵀ) ⊙ o[a]
  // rank_scale g (L, r_max), out_scale o (L, out_features) (VeRA, gates, DyLoRA per adapter;
  // None: ones); dropout on the adapter's input, token t's mask being row t of lora_linear's
  // mask for the same seed (so one adapter on every token is exactly lora_linear). Returns
  // (y, hidden), hidden = drop(x) A[a_t]ᵀ before the gates (T, r_max) in the accumulation
  // dtype, saved for the backward op. token_order / adapter_offsets: the batch's grouping from
  // multi_lora_segments, or None to compute it here.
  m.def(
      "multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor adapter_ids, Tensor scales, Tensor? ranks, Tensor? token_order, Tensor? adapter_offsets, "
      "Tensor? rank_scale=None, Tensor? out_scale=None, float dropout_p=0.0, Tensor? seed=None) "
      "-> (Tensor, Tensor)");
  // Gradients of multi_lora_linear for (x, weight, bias, lora_a, lora_b, scales, rank_scale,
  // out_scale); adapter gradients accumulate per adapter over its tokens (zero past each
  // adapter's rank). The dropout mask is regenerated from the seed.
  m.def(
      "multi_lora_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor adapter_ids, Tensor scales, Tensor? ranks, Tensor hidden, Tensor token_order, "
      "Tensor adapter_offsets, bool[8] output_mask, Tensor? rank_scale=None, Tensor? out_scale=None, "
      "float dropout_p=0.0, Tensor? seed=None) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // ---- galore ------------------------------------------------------------------------
  // The low-rank Adam step of GaLore (arXiv 2403.03507) and Fira (arXiv 2410.01623), in place
  // on the moments of the projected gradient R (HF-style ε, outside the square root):
  //   m ← β₁m + (1 − β₁)R,  v ← β₂v + (1 − β₂)R²;  returns N = m / (√v + ε).
  // Moments are float32 or bfloat16, or float64 (float64 weights; on CPU and CUDA alike); N is
  // float32 (float64 for float64 moments). grad: float32, bfloat16, float64 (float16 on CUDA).
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

  // ---- miss ----------------------------------------------------------------------------
  // Block-affine adapters — Bone ("Bone: Block-Affine Adaptation of Large Language Models",
  // arXiv 2409.15371) and its successor MiSS (same arXiv entry, later versions; PEFT's
  // `tuners.miss`). W is the frozen base weight (out, in), r the block size, M miss_block.
  // balance (M of shape (r, out)) and mini (M of shape (r, mini_r), mini_r | out):
  //   ΔW[o, c] = M[c mod r, o mod cols(M)],  y = x Wᵀ + b + S M,  S[t, k] = Σ_{c ≡ k (mod r)} drop(x)[t, c]
  // (x cut into chunks of r, the last one zero-padded, the chunks summed). Returns (y, chunk_sum)
  // with chunk_sum = S in float32 (float64 for float64 x), shape (..., r), saved for backward.
  m.def(
      "miss_linear(Tensor x, Tensor weight, Tensor? bias, Tensor miss_block, float dropout_p, Tensor? seed) "
      "-> (Tensor, Tensor)");
  // Gradients of miss_linear for (x, weight, bias, miss_block); output_mask says which. The
  // dropout mask is regenerated from the seed, never stored.
  m.def(
      "miss_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor miss_block, Tensor chunk_sum, "
      "float dropout_p, Tensor? seed, bool[4] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?)");
  // bat (M of shape (out/r, r, r), r | in and r | out): for the r×r block (p, q) of W,
  //   ΔW_pq = W_pq M_p + M_p,  y = x (W + ΔW)ᵀ + b.  No dropout (as in PEFT).
  // W + ΔW is never built whole: each chunk of its rows is built where the GEMM consumes it.
  m.def("miss_bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor miss_block) -> Tensor");
  // Gradients of miss_bat_linear for (x, weight, bias, miss_block): dx = dy (W + ΔW),
  // dM_p = Σ_q (W_pq + I)ᵀ G_pq and dW_pq = G_pq (I + M_p)ᵀ with G = dyᵀx formed block by block.
  m.def(
      "miss_bat_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor miss_block, bool[4] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?)");

  // ---- dropout complement (DoRA with dropout, CPU) ----------------------------------
  // y = (x ⊙ dropped) Wᵀ: the part of x Wᵀ that the inverted-dropout mask of (seed, dropout_p)
  // removes (the same Philox mask as every fused dropout and dropout_mask), from the dropped
  // entries only. With it x_d Wᵀ = keep_scale · (x Wᵀ − y), which DoRA with dropout needs next
  // to x Wᵀ (PEFT's formula): a fraction p of a GEMM instead of a second one. x (..., in),
  // weight (out, in), float32 / float64, CPU. The backward gives x's gradient only (dz W on
  // the dropped entries, 0 elsewhere); weight must be frozen.
  m.def("dropout_complement_linear(Tensor x, Tensor weight, Tensor seed, float dropout_p) -> Tensor");
  m.def("dropout_complement_linear_backward(Tensor grad_out, Tensor weight, Tensor seed, float dropout_p) -> Tensor");

  // ---- sparse_lowrank ----------------------------------------------------------------
  // Sparse plus low-rank linear layer: y = x Wᵀ + b, W = s·B A + S, S with a fixed support whose
  // values train — SLTrain (arXiv 2406.02214; S on a random support) and LOST ("Low-rank
  // and Sparse Pre-training for LLMs", 2025; S dense on n input channels: x Sᵀ = x[:, cols] Vᵀ). W is never formed in
  // backward; forward may form it transiently (never saved) when that costs fewer operations.
  // lora_a (r, in), lora_b (out, r). The support is told apart by sparse_values' rank:
  //   values (nnz,): sparse_support is int64 (nnz,) unique flat row-major indices into (out, in)
  //     (SLTrain's storage, compressed per call) or the int32 compressed support below;
  //   values (out, n): sparse_support is int64 (n,) distinct input channels (columns).
  // Compressed random support, built once per layer from flat indices (any order; duplicates
  // and out-of-range indices are errors), int32 of length out + in + 2 + 4·nnz:
  //   [row_ptr (out+1) | csr_col (nnz) | csr_perm (nnz) | col_ptr (in+1) | csc_row (nnz) | csc_perm (nnz)],
  // csr_perm / csc_perm giving each entry's position in sparse_values.
  m.def("sparse_support_compress(Tensor indices, int out_features, int in_features) -> Tensor");
  m.def(
      "sparse_lowrank_linear(Tensor x, Tensor lora_a, Tensor lora_b, Tensor sparse_values, Tensor sparse_support, "
      "Tensor? bias, float scale) -> Tensor");
  // Gradients for (x, lora_a, lora_b, sparse_values, bias): dB = s·dyᵀ(x Aᵀ), dA = s·(dy B)ᵀ x,
  // dS = dyᵀx sampled on the support only (SDDMM), dx = s·(dy B) A + dy S (SpMM); output_mask
  // says which. x Aᵀ is recomputed (the forward saves only its inputs), by chunks of tokens.
  // The bias gradient comes back in float32 (float64 for float64 x), the others in their
  // tensor's dtype.
  m.def(
      "sparse_lowrank_linear_backward(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor sparse_values, "
      "Tensor sparse_support, float scale, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

  // ---- gqa ---------------------------------------------------------------------------
  // Grouped-query attention — GQA (arXiv 2305.13245), the form KV-head-compressed models run
  // in; computed flash-style (FlashAttention-2, arXiv 2307.08691; split-KV decode with an LSE
  // merge, flash-decoding). q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), Hq a multiple of Hkv,
  // query head h reading KV head h / (Hq / Hkv); any strides with a unit stride over D ≤ 256:
  //   o[b, h, i] = Σ_j softmax_j(scale·⟨q_bhi, k_bgj⟩ + mask[b, h, i, j]) v_bgj,  g = h / (Hq / Hkv),
  // over the keys j < kv_lens[b] (all Sk when None) and, with causal, j ≤ i + kv_lens[b] − Sq
  // (bottom-right aligned, FlashAttention's convention; SDPA's is_causal is top-left).
  // attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Sq, Sk), read
  // through stride-0 broadcasts, never expanded. Returns (o, lse): o (B, Hq, Sq, D) contiguous in
  // q's dtype, lse (B, Hq, Sq) = log Σ_j exp(score) in float32 (float64 for float64). A row with
  // no visible key gets o = 0 and lse = −inf (as SDPA on CPU returns 0 for a fully masked row).
  m.def(
      "gqa_attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? kv_lens, Tensor? attn_mask) "
      "-> (Tensor, Tensor)");
  // Gradients of gqa_attention for (q, k, v), P recomputed from lse tile by tile (no (Sq, Sk)
  // tensor) with Di = rowsum(dO ⊙ O): dS = P ⊙ (dO Vᵀ − Di); each KV head's gradient sums over
  // its group's query heads. output_mask says which to compute; attn_mask gets no gradient.
  m.def(
      "gqa_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, "
      "float scale, Tensor? kv_lens, Tensor? attn_mask, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lrkernels native library: the ops are registered under torch.ops.lrkernels";
  m.def("build_info", &lrkernels::build_info,
        "What this build contains: CUDA compiled in or not, arch list, torch and CUDA versions.");
  m.def(
      "cpu_capability", [] { return std::string(lrkernels::cpu_capability_name(lrkernels::cpu_capability())); },
      "The instruction set the vectorised CPU kernels run with now: default, avx2 or avx512.");
  m.def(
      "cpu_capability_detected",
      [] { return std::string(lrkernels::cpu_capability_name(lrkernels::cpu_capability_detected())); },
      "The best instruction set this CPU runs and this build compiled.");
  m.def(
      "cpu_capabilities_compiled",
      [] {
        std::vector<std::string> out;
        for (auto c : {lrkernels::CpuCapability::kDefault, lrkernels::CpuCapability::kAvx2,
                       lrkernels::CpuCapability::kAvx512})
          if (lrkernels::cpu_capability_compiled(c)) out.emplace_back(lrkernels::cpu_capability_name(c));
        return out;
      },
      "The instruction sets this build compiled the vectorised CPU kernels for.");
  m.def(
      "set_cpu_capability",
      [](int c) {
        TORCH_CHECK_VALUE(c >= 0 && c <= 2, "lrkernels: CPU capability must be 0, 1 or 2, got ", c);
        return std::string(
            lrkernels::cpu_capability_name(lrkernels::set_cpu_capability(static_cast<lrkernels::CpuCapability>(c))));
      },
      "Cap the instruction set (0 default, 1 avx2, 2 avx512) at most at the detected one; returns the one in force.");
  m.def(
      "get_cpu_kernels", [] { return static_cast<int>(lrkernels::cpu_kernels()); },
      "CPU kernel path: 0 auto, 1 aten, 2 blocked.");
  m.def(
      "set_cpu_kernels",
      [](int mode) {
        TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "lrkernels: CPU kernel mode must be 0, 1 or 2, got ", mode);
        lrkernels::set_cpu_kernels(static_cast<lrkernels::CpuKernels>(mode));
      },
      "Select the CPU kernel path: 0 auto, 1 aten, 2 blocked.");
  m.def(
      "get_cuda_kernels",
      [] {
        pybind11::dict d;
        for (int f = 0; f < lrkernels::kCudaFamilies; ++f) {
          const auto family = static_cast<lrkernels::CudaFamily>(f);
          d[lrkernels::cuda_family_name(family)] = static_cast<int>(lrkernels::cuda_kernels(family));
        }
        return d;
      },
      "CUDA kernel path per family: {family: 0 auto, 1 simt, 2 tensor_core}.");
  m.def(
      "set_cuda_kernels",
      [](const std::string& family, int mode) {
        TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "lrkernels: CUDA kernel mode must be 0, 1 or 2, got ", mode);
        for (int f = 0; f < lrkernels::kCudaFamilies; ++f) {
          const auto fam = static_cast<lrkernels::CudaFamily>(f);
          if (family == lrkernels::cuda_family_name(fam)) {
            lrkernels::set_cuda_kernels(fam, static_cast<lrkernels::CudaKernels>(mode));
            return;
          }
        }
        TORCH_CHECK_VALUE(false, "lrkernels: unknown CUDA kernel family ", family);
      },
      "Select one family's CUDA kernel path: 0 auto, 1 simt, 2 tensor_core.");
  m.def(
      "cuda_kernel_launches",
      [] {
        pybind11::dict d;
        for (int f = 0; f < lrkernels::kCudaFamilies; ++f) {
          const auto fam = static_cast<lrkernels::CudaFamily>(f);
          for (int k = 0; k < lrkernels::kCudaKernels; ++k) {
            const auto kernel = static_cast<lrkernels::CudaKernel>(k);
            for (bool tc : {false, true}) {
              const std::string key = std::string(lrkernels::cuda_family_name(fam)) + "." +
                                      lrkernels::cuda_kernel_name(kernel) + (tc ? ".tensor_core" : ".simt");
              d[key.c_str()] = lrkernels::cuda_launch_count(fam, kernel, tc);
            }
          }
          d[(std::string(lrkernels::cuda_family_name(fam)) + ".tensor_core_image_arch").c_str()] =
              lrkernels::tensor_core_image_arch(fam);
        }
        return d;
      },
      "Launches made per family, kernel and path since the last reset, and the tensor-core image arch seen.");
  m.def("reset_cuda_kernel_launches", &lrkernels::reset_cuda_launch_counts, "Zero the CUDA launch counters.");
}
