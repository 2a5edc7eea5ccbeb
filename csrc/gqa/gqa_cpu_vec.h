// The tile kernels of gqa_attention on CPU (gqa_cpu_vec.cpp, one copy per instruction set: see
// common/cpu_vec.h), shared by the op file that validates, allocates and spreads the tasks over
// threads (gqa_cpu.cpp).
//
// A task is one KV head g of one batch entry b together with the G = Hq / Hkv query heads that
// share it: their query rows (G heads × a block of positions) are processed as one block against
// each K/V tile, so every KV head is read once per group. Within a task the flash recurrence
// runs in the accumulation dtype (float32 for float32 / bfloat16 inputs, float64 for float64):
// scores of a (rows × kGqaKeyTile) tile, a running row maximum and sum (online softmax), and
// the output accumulated unnormalised and rescaled when the maximum grows.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "common/cpu_features.h"

namespace lrkernels {

// Keys per K/V tile, and query rows (heads of a group × positions) per block.
constexpr int64_t kGqaKeyTile = 64;
constexpr int64_t kGqaBlockRows = 64;

// Query positions per block for a group of G heads.
inline int64_t gqa_block_queries(int64_t G) { return G >= kGqaBlockRows ? 1 : kGqaBlockRows / G; }

// Everything the kernels read, as raw pointers and element strides (a plain struct: the kernels
// know nothing of at::Tensor). q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), unit stride over D.
struct GqaParams {
  int64_t B, Hq, Hkv, G, Sq, Sk, D;
  const void *q, *k, *v;                 // input dtype E
  int64_t q_s[3], k_s[3], v_s[3];        // strides over (batch, head, position)
  const int64_t* kv_lens;                // (B,): keys used by each sequence; null: Sk
  const void* mask;                      // additive, accumulation dtype; null: none
  int64_t m_s[4];                        // strides over (b, h, i, j), 0 on broadcast dims
  bool causal;                           // bottom-right aligned, relative to kv_lens[b]
  double scale;
  // backward only
  const void *grad_o, *o;                // dtype E
  int64_t go_s[3], o_s[3];
  const void* lse;                       // accumulation dtype, contiguous (B, Hq, Sq)
};

// Keys sequence b uses, and the end of the keys query i sees (causal: j ≤ i + len − Sq).
inline int64_t gqa_kv_len(const GqaParams& p, int64_t b) { return p.kv_lens ? p.kv_lens[b] : p.Sk; }
inline int64_t gqa_key_end(const GqaParams& p, int64_t len, int64_t i) {
  if (!p.causal) return len;
  const int64_t e = i + len - p.Sq + 1;
  return e < 0 ? 0 : (e > len ? len : e);
}

template <typename E>
struct GqaVecFns {
  // Attention of query positions [q0, q1) of the G heads sharing KV head g of batch b, over keys
  // [k0, k1). With o_part null: the finished rows, o (contiguous (B, Hq, Sq, D), dtype E) and
  // lse (contiguous (B, Hq, Sq)). Otherwise the partial result over these keys alone, normalised:
  // o_part (rows × D) and lse_part (rows) in the accumulation dtype, row r = hl·(q1 − q0) + (i − q0)
  // for head g·G + hl. A row that sees no key gets o = 0 and lse = −inf.
  void (*forward)(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, int64_t k0, int64_t k1, E* o,
                  void* lse, void* o_part, void* lse_part);
  // Merges n partial results of the block (layout above; split s at o_parts + s·part_stride,
  // lse_parts + s·lse_stride) by their log-sum-exp into o and lse.
  void (*combine)(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, int64_t n, const void* o_parts,
                  int64_t part_stride, const void* lse_parts, int64_t lse_stride, E* o, void* lse);
  // dK and dV (either may be null) of keys [j0, j1) (j1 − j0 ≤ kGqaKeyTile) of KV head g, batch b:
  // every query row of the group is visited; P is recomputed from lse. Rows written into
  // contiguous (B, Hkv, Sk, D) outputs; keys past kv_lens[b] are left untouched.
  void (*grad_kv)(const GqaParams& p, int64_t b, int64_t g, int64_t j0, int64_t j1, E* dk, E* dv);
  // dQ of query positions [q0, q1) of the group, into a contiguous (B, Hq, Sq, D) output.
  void (*grad_q)(const GqaParams& p, int64_t b, int64_t g, int64_t q0, int64_t q1, E* dq);
  // dQ, dK and dV (all three non-null) of the whole group in one pass, each score recomputed
  // once; dK / dV rows past kv_lens[b] are left untouched. Needs 2·len·D accumulators.
  void (*grad_group)(const GqaParams& p, int64_t b, int64_t g, E* dq, E* dk, E* dv);
};

struct GqaVecKernels {
  GqaVecFns<float> f32;
  GqaVecFns<double> f64;
  GqaVecFns<c10::BFloat16> bf16;
};

LRK_DECLARE_VEC_KERNELS(GqaVecKernels, gqa_vec_kernels)

template <typename E>
inline const GqaVecFns<E>& gqa_vec_fns() {
  if constexpr (sizeof(E) == 8) return gqa_vec_kernels().f64;
  else if constexpr (sizeof(E) == 4) return gqa_vec_kernels().f32;
  else return gqa_vec_kernels().bf16;
}

}  // namespace lrkernels
