// Plain parameter structs between the torch binding (csrc/gqa/gqa_cuda.cu) and the GQA
// attention kernels (gqa.cuh). No torch types: pointers, element strides, sizes and scalars.
//
// Notation (the gqa_attention op): q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), G = Hq / Hkv, query
// head h reading KV head h / G. Every tensor has a unit stride over D; the strides given are over
// (batch, head, position), in elements. Sequence b uses its first len_b = kv_lens[b] keys (Sk
// when kv_lens is null; values are clamped to [0, Sk] on the device, which cannot raise), and
// with causal query i sees key j iff j < i + len_b − Sq + 1 (bottom-right aligned).
// Scores s = scale·⟨q, k⟩ + mask (bool: False → −inf), softmax and every sum in float32;
// lse = log Σ_j exp(s_j) (natural log); a row that sees no key gets o = 0 and lse = −inf.
#pragma once

#include <cstdint>

namespace lrkernels {

struct GqaAttnInputs {
  int64_t B = 0, Hq = 0, Hkv = 0, G = 1, Sq = 0, Sk = 0, D = 0;
  const void* q = nullptr;  // storage dtype T (float, __half or __nv_bfloat16)
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_s[3] = {0, 0, 0}, k_s[3] = {0, 0, 0}, v_s[3] = {0, 0, 0};
  // (B,) keys per sequence, int32 or int64 (at most one set), element stride kv_lens_s
  const int32_t* kv_lens32 = nullptr;
  const int64_t* kv_lens64 = nullptr;
  int64_t kv_lens_s = 1;
  // broadcastable to (B, Hq, Sq, Sk) through m_s (0 on broadcast dims): bool (True = attend,
  // one byte per element) when mask_is_bool, else additive float32
  const void* mask = nullptr;
  int64_t m_s[4] = {0, 0, 0, 0};
  bool mask_is_bool = false;
  float scale = 1.0f;
  bool causal = false;
};

// Forward. n_split = 1: o (contiguous (B, Hq, Sq, D), dtype T) and lse (contiguous (B, Hq, Sq),
// float32) written directly. n_split > 1 (split-KV decode, flash-decoding): split s covers keys
// [s·split_keys, (s + 1)·split_keys) and writes its normalised partial output and LSE into the
// workspace, o_part (n_split, B·Hq·Sq, D) and lse_part (n_split, B·Hq·Sq), both float32; the
// combine kernel then merges the splits by their LSE into o and lse.
struct GqaFwdParams {
  GqaAttnInputs in;
  void* o = nullptr;
  float* lse = nullptr;
  int64_t n_split = 1, split_keys = 0;
  float* o_part = nullptr;
  float* lse_part = nullptr;
};

// Backward (FlashAttention-2: P recomputed from lse, dS = P ⊙ (dO Vᵀ − Δ), Δ = rowsum(dO ⊙ O)).
// grad_o and o with their own strides (dtype T); lse contiguous (B, Hq, Sq) float32 (the forward's).
// dQ, two ways: by default the key-tile blocks add their contributions into dq_acc, a zeroed
// float32 (B, Hq, Sq, D) workspace (atomics; dq_acc may be dq itself when T is float), then dq =
// dq_acc rounded; with deterministic_dq a pass of its own over query tiles writes dq (no atomics,
// the same bits every run; the scores are recomputed once more) and dq_acc is unused.
// Workspace: delta (B·Hq·Sq) float32. Outputs dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D),
// contiguous, dtype T; any may be null (not wanted). Every row of each output is written (zeros
// where no key / query is visible).
struct GqaBwdParams {
  GqaAttnInputs in;
  const void* grad_o = nullptr;
  const void* o = nullptr;
  int64_t go_s[3] = {0, 0, 0}, o_s[3] = {0, 0, 0};
  const float* lse = nullptr;
  float* delta = nullptr;
  float* dq_acc = nullptr;
  bool deterministic_dq = false;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
};

}  // namespace lrkernels
