// GQA attention kernels (see gqa_params.h): FlashAttention-2's forward recurrence (arXiv
// 2307.08691) with every query head of a GQA group (arXiv 2305.13245) against each K/V tile, the
// split-KV decode of flash-decoding with its LSE combine, and the backward that recomputes
// P = exp(S − lse) tile by tile (no (Sq, Sk) score tensor): dK / dV per key tile with dQ added
// by float32 atomics, or dQ from a deterministic pass of its own over query tiles.
//
// Grouping: a block owns one KV head g of one batch entry b and a tile of the group's query rows,
// row ρ = i·G + hl for position i and head g·G + hl (positions outermost, so a tile spans few
// positions and its causal key range stays tight). Each K/V tile is staged once in shared memory
// for all G heads of the group: K/V are read from global memory once per group and row tile, not
// once per query head.
//
// Plain SIMT kernels in float32 (storage float, __half or __nv_bfloat16, converted when staged),
// written for a first GPU run to be right rather than fast: no tensor cores, no warp shuffles,
// block-wide reductions through shared memory. The head dim is a template bucket kD (32, 64, 128,
// 256) with D ≤ kD handled by zero padding (padded Q/K/V columns add nothing to a dot product and
// padded output columns are never written).
//
// The host never reads device data: sizes come from the shapes, kv_lens is read by the kernels,
// and the launch grids depend on Sk (not on kv_lens), so a captured CUDA graph stays valid when
// kv_lens changes between replays.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "lrkernels/common/cuda_check.cuh"
#include "lrkernels/common/macros.h"
#include "lrkernels/common/math.cuh"
#include "lrkernels/gqa_params.h"

namespace lrkernels {
namespace gqa {

constexpr int kThreads = 128;
// Forward: query rows per block; keys per tile, as many as fit the 48 KiB of static shared memory
// next to the row tile (Q, K, V staged in float32 with one column of padding).
constexpr int kFwdRows = 16;
template <int kD>
struct FwdTile {
  static constexpr int kRows = kFwdRows;
  static constexpr int kKeys = kD <= 64 ? 64 : (kD <= 128 ? 32 : 8);
};
// Backward: dK / dV accumulate in registers for a tile of keys, the group's rows stream through.
template <int kD>
struct BwdTile {
  static constexpr int kKeys = kD <= 128 ? 16 : 8;
  static constexpr int kRows = kD <= 128 ? 16 : 8;
};
// A KV split gets at least this many keys: below it the combine costs more than it saves.
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kMaxSplits = 128;
constexpr int64_t kMaxGridBlocks = 65535 * 8;  // grid-stride beyond this (elementwise kernels)

LRK_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The head-dim bucket (a template constant) for a runtime D ≤ 256.
#define LRK_GQA_HEAD_DIM_SWITCH(D, CONST_NAME, ...) \
  [&] {                                             \
    if ((D) <= 32) {                                \
      constexpr static int CONST_NAME = 32;         \
      return __VA_ARGS__();                         \
    } else if ((D) <= 64) {                         \
      constexpr static int CONST_NAME = 64;         \
      return __VA_ARGS__();                         \
    } else if ((D) <= 128) {                        \
      constexpr static int CONST_NAME = 128;        \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr static int CONST_NAME = 256;        \
      return __VA_ARGS__();                         \
    }                                               \
  }()

inline int fwd_key_tile(int64_t D) {
  return LRK_GQA_HEAD_DIM_SWITCH(D, kD, [&] { return FwdTile<kD>::kKeys; });
}

// Splits of the key range for the forward: 1 unless the (batch, KV head, row tile) blocks are
// too few to fill the GPU (decode), then enough splits for ~4 blocks per SM, each of whole key
// tiles and at least kMinSplitKeys keys. Depends on shapes only (never on kv_lens).
struct SplitPlan {
  int64_t n_split = 1, split_keys = 0;
};
inline SplitPlan plan_splits(const GqaAttnInputs& in, int64_t num_sms) {
  SplitPlan plan;
  plan.split_keys = in.Sk;
  const int64_t base = in.B * in.Hkv * ceil_div(in.G * in.Sq, kFwdRows);
  const int64_t target = 4 * (num_sms < 1 ? 1 : num_sms);
  if (base == 0 || base >= target || in.Sk < 2 * kMinSplitKeys) return plan;
  int64_t n = ceil_div(target, base);
  const int64_t most = in.Sk / kMinSplitKeys;
  n = n < most ? n : most;
  n = n < kMaxSplits ? n : kMaxSplits;
  if (n <= 1) return plan;
  const int64_t kt = fwd_key_tile(in.D);
  plan.split_keys = ceil_div(ceil_div(in.Sk, n), kt) * kt;
  plan.n_split = ceil_div(in.Sk, plan.split_keys);
  if (plan.n_split <= 1) plan.split_keys = in.Sk, plan.n_split = 1;
  return plan;
}

// ------------------------------------------------------------------------- device helpers

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

// max that lets a NaN through (as the CPU kernels do): a NaN score poisons its row, never vanishes
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

__device__ __forceinline__ int64_t kv_len(const GqaAttnInputs& in, int64_t b) {
  int64_t l = in.Sk;
  if (in.kv_lens64 != nullptr) l = in.kv_lens64[b * in.kv_lens_s];
  else if (in.kv_lens32 != nullptr) l = in.kv_lens32[b * in.kv_lens_s];
  return l < 0 ? 0 : (l > in.Sk ? in.Sk : l);
}

// One past the last key query i sees (causal: j ≤ i + len − Sq).
__device__ __forceinline__ int64_t key_end(const GqaAttnInputs& in, int64_t len, int64_t i) {
  if (!in.causal) return len;
  const int64_t e = i + len - in.Sq + 1;
  return e < 0 ? 0 : (e > len ? len : e);
}

// The mask term of score (b, h, i, j): 0, −inf (a False of a bool mask), or the additive value.
__device__ __forceinline__ float mask_term(const GqaAttnInputs& in, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (in.mask == nullptr) return 0.0f;
  const int64_t off = b * in.m_s[0] + h * in.m_s[1] + i * in.m_s[2] + j * in.m_s[3];
  if (in.mask_is_bool) return static_cast<const bool*>(in.mask)[off] ? 0.0f : neg_inf();
  return static_cast<const float*>(in.mask)[off];
}

// Stages the first n rows of a (·, D) slab (row stride ld, unit column stride) as float32 into
// dst[kN][kD + 1], zeros past n rows and past D columns. When the rows start on 16-byte
// boundaries (slab pointer, row stride and D all multiples of 16 bytes: the usual contiguous or
// (B, S, H, D) cache) each thread moves whole 16-byte words, so a warp reads 512 contiguous bytes
// per load (decode is bound by this read); otherwise element by element.
template <typename T, int kN, int kD>
__device__ __forceinline__ void stage_rows(const T* src, int64_t ld, int64_t n, int64_t D, float (*dst)[kD + 1]) {
  constexpr int V = 16 / static_cast<int>(sizeof(T)), W = kD / V;  // elements per word, words per row
  const bool words = reinterpret_cast<uintptr_t>(src) % 16 == 0 && (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                     (D * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (words) {
    for (int e = threadIdx.x; e < kN * W; e += kThreads) {
      const int r = e / W, d0 = (e % W) * V;
      if (r < n && d0 < D) {
        const uint4 w = *reinterpret_cast<const uint4*>(src + r * ld + d0);
        const T* x = reinterpret_cast<const T*>(&w);
        LRK_UNROLL
        for (int t = 0; t < V; ++t) dst[r][d0 + t] = to_float(x[t]);
      } else {
        LRK_UNROLL
        for (int t = 0; t < V; ++t) dst[r][d0 + t] = 0.0f;
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < kN * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    dst[r][d] = (r < n && d < D) ? to_float(src[r * ld + d]) : 0.0f;
  }
}

// ------------------------------------------------------------------------- forward

// Block x = ((b·Hkv + g)·n_tiles + tile)·n_split + split. Thread t owns, for P V, row t / 8 and
// columns t % 8 + 8u of the output tile (registers); scores and the softmax statistics go
// through shared memory.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(GqaFwdParams p) {
  constexpr int R = FwdTile<kD>::kRows, KT = FwdTile<kD>::kKeys, CPT = kD / 8;
  static_assert(R * 8 == kThreads, "P V maps 8 threads to each query row");
  __shared__ float Qs[R][kD + 1];
  __shared__ float Ks[KT][kD + 1];
  __shared__ float Vs[KT][kD + 1];
  __shared__ float S[R][KT + 1];
  __shared__ float row_m[R], row_l[R], row_alpha[R];
  __shared__ int64_t row_end[R];

  const GqaAttnInputs& in = p.in;
  const int tid = threadIdx.x;
  const int64_t G = in.G, D = in.D, rows = G * in.Sq;
  const int64_t n_tiles = ceil_div(rows, R);
  int64_t x = blockIdx.x;
  const int64_t split = x % p.n_split;
  x /= p.n_split;
  const int64_t tile = x % n_tiles;
  x /= n_tiles;
  const int64_t g = x % in.Hkv, b = x / in.Hkv;
  const int64_t rho0 = tile * R;
  const int64_t len = kv_len(in, b);

  const T* q = static_cast<const T*>(in.q) + b * in.q_s[0];
  for (int e = tid; e < R * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    const int64_t rho = rho0 + r;
    float val = 0.0f;
    if (rho < rows && d < D) val = to_float(q[(g * G + rho % G) * in.q_s[1] + (rho / G) * in.q_s[2] + d]);
    Qs[r][d] = val;
  }
  if (tid < R) {
    const int64_t rho = rho0 + tid;
    row_end[tid] = rho < rows ? key_end(in, len, rho / G) : 0;
    row_m[tid] = neg_inf();
    row_l[tid] = 0.0f;
  }
  // the block's keys: its split's range, up to the causal end of its last row (the largest)
  const int nr = static_cast<int>(rows - rho0 < R ? rows - rho0 : R);  // real rows of the tile
  const int64_t last = rho0 + nr - 1;
  int64_t k0 = 0, k1 = key_end(in, len, last / G);
  if (p.n_split > 1) {
    k0 = split * p.split_keys;
    if (k0 + p.split_keys < k1) k1 = k0 + p.split_keys;
  }

  const int pr = tid / 8, pc = tid % 8;  // P V: row and column phase of this thread
  float acc[CPT];
  LRK_UNROLL
  for (int u = 0; u < CPT; ++u) acc[u] = 0.0f;
  const T* kb = static_cast<const T*>(in.k) + b * in.k_s[0] + g * in.k_s[1];
  const T* vb = static_cast<const T*>(in.v) + b * in.v_s[0] + g * in.v_s[1];
  __syncthreads();

  for (int64_t j0 = k0; j0 < k1; j0 += KT) {
    const int kt = static_cast<int>(k1 - j0 < KT ? k1 - j0 : KT);
    stage_rows<T, KT, kD>(kb + j0 * in.k_s[2], in.k_s[2], kt, D, Ks);
    stage_rows<T, KT, kD>(vb + j0 * in.v_s[2], in.v_s[2], kt, D, Vs);
    __syncthreads();
    // scores: a warp shares one row (Q broadcast) over consecutive keys (padded K rows: no
    // conflicts); only the tile's nr real rows (decode: the G heads of one position)
    for (int e = tid; e < nr * KT; e += kThreads) {
      const int r = e / KT, j = e % KT;
      float s = neg_inf();
      if (j < kt && j0 + j < row_end[r]) {
        float dot = 0.0f;
        for (int d = 0; d < kD; ++d) dot += Qs[r][d] * Ks[j][d];
        const int64_t rho = rho0 + r;
        s = dot * in.scale + mask_term(in, b, g * G + rho % G, rho / G, j0 + j);
      }
      S[r][j] = s;
    }
    __syncthreads();
    // online softmax: one thread per row rescales its statistics and turns scores into weights
    if (tid < nr) {
      const float m_old = row_m[tid];
      float mx = m_old;
      for (int j = 0; j < kt; ++j) mx = nan_max(mx, S[tid][j]);
      float alpha = 1.0f;
      if (mx == neg_inf()) {  // nothing seen yet: no weight
        for (int j = 0; j < kt; ++j) S[tid][j] = 0.0f;
      } else {
        alpha = expf(m_old - mx);  // 0 when m_old is −inf
        float sum = 0.0f;
        for (int j = 0; j < kt; ++j) {
          const float e = expf(S[tid][j] - mx);
          S[tid][j] = e;
          sum += e;
        }
        row_l[tid] = row_l[tid] * alpha + sum;
        row_m[tid] = mx;
      }
      row_alpha[tid] = alpha;
    }
    __syncthreads();
    if (pr < nr) {
      const float alpha = row_alpha[pr];
      LRK_UNROLL
      for (int u = 0; u < CPT; ++u) acc[u] *= alpha;
      for (int j = 0; j < kt; ++j) {
        const float w = S[pr][j];
        LRK_UNROLL
        for (int u = 0; u < CPT; ++u) acc[u] += w * Vs[j][pc + 8 * u];
      }
    }
    __syncthreads();  // the next tile overwrites Ks, Vs and S
  }

  const int64_t rho = rho0 + pr;
  if (rho >= rows) return;
  const float l = row_l[pr];
  float inv = 0.0f, lse = neg_inf();
  if (!(l == 0.0f)) {  // (a NaN sum propagates)
    inv = 1.0f / l;
    lse = row_m[pr] + logf(l);
  }
  const int64_t row = (b * in.Hq + g * G + rho % G) * in.Sq + rho / G;
  if (p.n_split > 1) {
    const int64_t part = split * in.B * in.Hq * in.Sq + row;
    float* op = p.o_part + part * D;
    LRK_UNROLL
    for (int u = 0; u < CPT; ++u)
      if (pc + 8 * u < D) op[pc + 8 * u] = acc[u] * inv;
    if (pc == 0) p.lse_part[part] = lse;
  } else {
    T* op = static_cast<T*>(p.o) + row * D;
    LRK_UNROLL
    for (int u = 0; u < CPT; ++u)
      if (pc + 8 * u < D) op[pc + 8 * u] = from_float<T>(acc[u] * inv);
    if (pc == 0) p.lse[row] = lse;
  }
}

// Merges the n_split partial results of every row by their LSE: o = Σ_s w_s o_s / Σ_s w_s with
// w_s = exp(lse_s − max_s lse_s), lse = max + log Σ_s w_s. One thread per output element.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(GqaFwdParams p) {
  const int64_t D = p.in.D, nrows = p.in.B * p.in.Hq * p.in.Sq, n = nrows * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = idx / D, d = idx - row * D;
    float mx = neg_inf();
    for (int64_t s = 0; s < p.n_split; ++s) mx = nan_max(mx, p.lse_part[s * nrows + row]);
    float acc = 0.0f, lse = neg_inf();
    if (mx != neg_inf()) {
      float tot = 0.0f;
      for (int64_t s = 0; s < p.n_split; ++s) {
        const float w = expf(p.lse_part[s * nrows + row] - mx);
        if (w == 0.0f) continue;  // an empty split (o_s = 0, lse_s = −inf)
        tot += w;
        acc += w * p.o_part[(s * nrows + row) * D + d];
      }
      acc /= tot;
      lse = mx + logf(tot);
    }
    static_cast<T*>(p.o)[idx] = from_float<T>(acc);
    if (d == 0) p.lse[row] = lse;
  }
}

// ------------------------------------------------------------------------- backward

// Δ[row] = ⟨dO_row, O_row⟩ in float32, one thread per row of (B, Hq, Sq).
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(GqaBwdParams p) {
  const GqaAttnInputs& in = p.in;
  const int64_t n = in.B * in.Hq * in.Sq;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < n;
       row += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = row % in.Sq, h = (row / in.Sq) % in.Hq, b = row / (in.Sq * in.Hq);
    const T* go = static_cast<const T*>(p.grad_o) + b * p.go_s[0] + h * p.go_s[1] + i * p.go_s[2];
    const T* o = static_cast<const T*>(p.o) + b * p.o_s[0] + h * p.o_s[1] + i * p.o_s[2];
    float acc = 0.0f;
    for (int64_t d = 0; d < in.D; ++d) acc += to_float(go[d]) * to_float(o[d]);
    p.delta[row] = acc;
  }
}

// One block per (b, KV head g, key tile) — block x = (b·Hkv + g)·n_key_tiles + tile: its dK and
// dV rows accumulate in registers (thread t: key t / TPK, columns t % TPK + TPK·u) while every
// query row of the group that can see the tile streams through shared memory; its dQ
// contributions go to the float32 dq_acc with atomicAdd (so dQ's summation order varies run to
// run), unless deterministic_dq leaves dQ to dq_kernel.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) bwd_kernel(GqaBwdParams p) {
  constexpr int KT = BwdTile<kD>::kKeys, R = BwdTile<kD>::kRows;
  constexpr int TPK = kThreads / KT, CPT = kD / TPK;
  static_assert(KT * TPK == kThreads && CPT * TPK == kD, "the dK/dV tile maps onto the block");
  __shared__ float Ks[KT][kD + 1];
  __shared__ float Vs[KT][kD + 1];
  __shared__ float Qs[R][kD + 1];
  __shared__ float dOs[R][kD + 1];
  __shared__ float P[R][KT + 1];
  __shared__ float dS[R][KT + 1];
  __shared__ float row_lse[R], row_delta[R];
  __shared__ int64_t row_end[R];

  const GqaAttnInputs& in = p.in;
  const int tid = threadIdx.x;
  const int64_t G = in.G, D = in.D, rows = G * in.Sq;
  const int64_t n_tiles = ceil_div(in.Sk, KT);
  const int64_t tile = blockIdx.x % n_tiles, bg = blockIdx.x / n_tiles;
  const int64_t g = bg % in.Hkv, b = bg / in.Hkv;
  const int64_t j0 = tile * KT;
  const int64_t len = kv_len(in, b);
  const int kj = tid / TPK, kc = tid % TPK;  // this thread's key and column phase
  const int64_t kv_row = (b * in.Hkv + g) * in.Sk + j0 + kj;  // its row of dk / dv
  const bool own_row = j0 + kj < in.Sk;

  float dk_acc[CPT], dv_acc[CPT];
  LRK_UNROLL
  for (int u = 0; u < CPT; ++u) dk_acc[u] = dv_acc[u] = 0.0f;

  if (j0 < len) {  // (uniform over the block) a tile no query sees keeps zero gradients
    const int kt = static_cast<int>(len - j0 < KT ? len - j0 : KT);
    stage_rows<T, KT, kD>(static_cast<const T*>(in.k) + b * in.k_s[0] + g * in.k_s[1] + j0 * in.k_s[2], in.k_s[2],
                          kt, D, Ks);
    stage_rows<T, KT, kD>(static_cast<const T*>(in.v) + b * in.v_s[0] + g * in.v_s[1] + j0 * in.v_s[2], in.v_s[2],
                          kt, D, Vs);
    // with causal, query i sees key j0 only from i = j0 + Sq − len on: earlier rows skip the tile
    int64_t i_first = in.causal ? j0 + in.Sq - len : 0;
    if (i_first < 0) i_first = 0;
    const T* qb = static_cast<const T*>(in.q) + b * in.q_s[0];
    const T* gob = static_cast<const T*>(p.grad_o) + b * p.go_s[0];
    for (int64_t rho0 = i_first * G; rho0 < rows; rho0 += R) {
      for (int e = tid; e < R * kD; e += kThreads) {
        const int r = e / kD, d = e % kD;
        const int64_t rho = rho0 + r;
        float qv = 0.0f, gv = 0.0f;
        if (rho < rows && d < D) {
          const int64_t h = g * G + rho % G, i = rho / G;
          qv = to_float(qb[h * in.q_s[1] + i * in.q_s[2] + d]);
          gv = to_float(gob[h * p.go_s[1] + i * p.go_s[2] + d]);
        }
        Qs[r][d] = qv;
        dOs[r][d] = gv;
      }
      if (tid < R) {
        const int64_t rho = rho0 + tid;
        if (rho < rows) {
          const int64_t row = (b * in.Hq + g * G + rho % G) * in.Sq + rho / G;
          row_lse[tid] = p.lse[row];
          row_delta[tid] = p.delta[row];
          row_end[tid] = key_end(in, len, rho / G);
        } else {
          row_lse[tid] = neg_inf();
          row_delta[tid] = 0.0f;
          row_end[tid] = 0;
        }
      }
      __syncthreads();
      // P = exp(S − lse) and dS = scale·P ⊙ (dO Vᵀ − Δ), one (row, key) pair per step
      for (int e = tid; e < R * KT; e += kThreads) {
        const int r = e / KT, j = e % KT;
        float pv = 0.0f, dsv = 0.0f;
        const float lse = row_lse[r];
        if (j < kt && j0 + j < row_end[r] && lse != neg_inf()) {
          float s = 0.0f, dp = 0.0f;
          for (int d = 0; d < kD; ++d) {
            s += Qs[r][d] * Ks[j][d];
            dp += dOs[r][d] * Vs[j][d];
          }
          const int64_t rho = rho0 + r;
          s = s * in.scale + mask_term(in, b, g * G + rho % G, rho / G, j0 + j);
          pv = expf(s - lse);
          dsv = in.scale * pv * (dp - row_delta[r]);
        }
        P[r][j] = pv;
        dS[r][j] = dsv;
      }
      __syncthreads();
      // dV += Pᵀ dO, dK += dSᵀ Q (this thread's key and columns)
      for (int r = 0; r < R; ++r) {
        const float pw = P[r][kj], dw = dS[r][kj];
        LRK_UNROLL
        for (int u = 0; u < CPT; ++u) {
          dv_acc[u] += pw * dOs[r][kc + TPK * u];
          dk_acc[u] += dw * Qs[r][kc + TPK * u];
        }
      }
      // dQ += dS K, one (row, column) per step, added into dq_acc
      if (p.dq != nullptr && p.dq_acc != nullptr && !p.deterministic_dq) {
        for (int e = tid; e < R * kD; e += kThreads) {
          const int r = e / kD, d = e % kD;
          const int64_t rho = rho0 + r;
          if (rho >= rows || d >= D || row_lse[r] == neg_inf()) continue;
          float acc = 0.0f;
          for (int j = 0; j < kt; ++j) acc += dS[r][j] * Ks[j][d];
          const int64_t row = (b * in.Hq + g * G + rho % G) * in.Sq + rho / G;
          atomicAdd(p.dq_acc + row * D + d, acc);
        }
      }
      __syncthreads();  // the next row tile overwrites Qs, dOs, P and dS
    }
  }
  if (!own_row) return;
  LRK_UNROLL
  for (int u = 0; u < CPT; ++u) {
    const int d = kc + TPK * u;
    if (d >= D) continue;
    if (p.dk != nullptr) static_cast<T*>(p.dk)[kv_row * D + d] = from_float<T>(dk_acc[u]);
    if (p.dv != nullptr) static_cast<T*>(p.dv)[kv_row * D + d] = from_float<T>(dv_acc[u]);
  }
}

// The deterministic dQ (GqaBwdParams::deterministic_dq): one block per (b, KV head g, tile of R
// query rows), block x = (b·Hkv + g)·n_row_tiles + tile, the rows laid out as in the forward;
// thread t owns row t / TPR and columns t % TPR + TPR·u of dQ (registers), summed over the key
// tiles in order, so every run gives the same bits.
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) dq_kernel(GqaBwdParams p) {
  constexpr int KT = BwdTile<kD>::kKeys, R = BwdTile<kD>::kRows;
  constexpr int TPR = kThreads / R, CPT = kD / TPR;
  static_assert(R * TPR == kThreads && CPT * TPR == kD, "the dQ tile maps onto the block");
  __shared__ float Qs[R][kD + 1];
  __shared__ float dOs[R][kD + 1];
  __shared__ float Ks[KT][kD + 1];
  __shared__ float Vs[KT][kD + 1];
  __shared__ float dS[R][KT + 1];
  __shared__ float row_lse[R], row_delta[R];
  __shared__ int64_t row_end[R];

  const GqaAttnInputs& in = p.in;
  const int tid = threadIdx.x;
  const int64_t G = in.G, D = in.D, rows = G * in.Sq;
  const int64_t n_tiles = ceil_div(rows, R);
  const int64_t tile = blockIdx.x % n_tiles, bg = blockIdx.x / n_tiles;
  const int64_t g = bg % in.Hkv, b = bg / in.Hkv;
  const int64_t rho0 = tile * R;
  const int nr = static_cast<int>(rows - rho0 < R ? rows - rho0 : R);
  const int64_t len = kv_len(in, b);

  const T* qb = static_cast<const T*>(in.q) + b * in.q_s[0];
  const T* gob = static_cast<const T*>(p.grad_o) + b * p.go_s[0];
  for (int e = tid; e < R * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    float qv = 0.0f, gv = 0.0f;
    if (r < nr && d < D) {
      const int64_t rho = rho0 + r, h = g * G + rho % G, i = rho / G;
      qv = to_float(qb[h * in.q_s[1] + i * in.q_s[2] + d]);
      gv = to_float(gob[h * p.go_s[1] + i * p.go_s[2] + d]);
    }
    Qs[r][d] = qv;
    dOs[r][d] = gv;
  }
  if (tid < R) {
    const int64_t rho = rho0 + tid;
    if (tid < nr) {
      const int64_t row = (b * in.Hq + g * G + rho % G) * in.Sq + rho / G;
      row_lse[tid] = p.lse[row];
      row_delta[tid] = p.delta[row];
      row_end[tid] = key_end(in, len, rho / G);
    } else {
      row_lse[tid] = neg_inf();
      row_delta[tid] = 0.0f;
      row_end[tid] = 0;
    }
  }
  const int64_t kend = key_end(in, len, (rho0 + nr - 1) / G);  // the last row sees the most keys
  const int qr = tid / TPR, qc = tid % TPR;
  float acc[CPT];
  LRK_UNROLL
  for (int u = 0; u < CPT; ++u) acc[u] = 0.0f;
  const T* kb = static_cast<const T*>(in.k) + b * in.k_s[0] + g * in.k_s[1];
  const T* vb = static_cast<const T*>(in.v) + b * in.v_s[0] + g * in.v_s[1];
  __syncthreads();

  for (int64_t j0 = 0; j0 < kend; j0 += KT) {
    const int kt = static_cast<int>(kend - j0 < KT ? kend - j0 : KT);
    stage_rows<T, KT, kD>(kb + j0 * in.k_s[2], in.k_s[2], kt, D, Ks);
    stage_rows<T, KT, kD>(vb + j0 * in.v_s[2], in.v_s[2], kt, D, Vs);
    __syncthreads();
    for (int e = tid; e < nr * KT; e += kThreads) {
      const int r = e / KT, j = e % KT;
      float dsv = 0.0f;
      const float lse = row_lse[r];
      if (j < kt && j0 + j < row_end[r] && lse != neg_inf()) {
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < kD; ++d) {
          s += Qs[r][d] * Ks[j][d];
          dp += dOs[r][d] * Vs[j][d];
        }
        const int64_t rho = rho0 + r;
        s = s * in.scale + mask_term(in, b, g * G + rho % G, rho / G, j0 + j);
        dsv = in.scale * expf(s - lse) * (dp - row_delta[r]);
      }
      dS[r][j] = dsv;
    }
    __syncthreads();
    if (qr < nr) {
      for (int j = 0; j < kt; ++j) {
        const float w = dS[qr][j];
        LRK_UNROLL
        for (int u = 0; u < CPT; ++u) acc[u] += w * Ks[j][qc + TPR * u];
      }
    }
    __syncthreads();  // the next tile overwrites Ks, Vs and dS
  }
  if (qr >= nr) return;
  const int64_t rho = rho0 + qr;
  T* dq = static_cast<T*>(p.dq) + ((b * in.Hq + g * G + rho % G) * in.Sq + rho / G) * D;
  LRK_UNROLL
  for (int u = 0; u < CPT; ++u)
    if (qc + TPR * u < D) dq[qc + TPR * u] = from_float<T>(acc[u]);
}

// dq = dq_acc rounded to T.
template <typename T>
__global__ void __launch_bounds__(kThreads) convert_kernel(const float* src, T* dst, int64_t n) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * kThreads)
    dst[idx] = from_float<T>(src[idx]);
}

// ------------------------------------------------------------------------- launchers

inline unsigned elementwise_blocks(int64_t n) {
  const int64_t b = ceil_div(n, kThreads);
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxGridBlocks ? kMaxGridBlocks : b));
}

// The forward: o and lse for every row, through the workspace when p.n_split > 1 (then
// p.o_part / p.lse_part are set and p.split_keys is a multiple of the key tile, see plan_splits).
template <typename T>
inline cudaError_t launch_forward(const GqaFwdParams& p, cudaStream_t stream) {
  const GqaAttnInputs& in = p.in;
  const int64_t rows = in.B * in.Hq * in.Sq;
  if (rows == 0 || in.D == 0) return cudaSuccess;
  const int64_t blocks = in.B * in.Hkv * ceil_div(in.G * in.Sq, kFwdRows) * p.n_split;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(blocks);
  LRK_GQA_HEAD_DIM_SWITCH(in.D, kD, [&] {
    fwd_kernel<T, kD><<<grid, kThreads, 0, stream>>>(p);
  });
  LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (p.n_split > 1) {
    combine_kernel<T><<<elementwise_blocks(rows * in.D), kThreads, 0, stream>>>(p);
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// The backward: Δ, then dK / dV per key tile, and dQ either into dq_acc by the same blocks (then
// dq from dq_acc when it is a separate buffer; dq_acc zeroed by the caller) or, with
// deterministic_dq, by its own pass over query tiles. Every dk / dv row is written.
template <typename T>
inline cudaError_t launch_backward(const GqaBwdParams& p, cudaStream_t stream) {
  const GqaAttnInputs& in = p.in;
  const int64_t rows = in.B * in.Hq * in.Sq;
  if (in.B * in.Hkv * in.Sk == 0 && rows == 0) return cudaSuccess;
  if (rows > 0) {
    delta_kernel<T><<<elementwise_blocks(rows), kThreads, 0, stream>>>(p);
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  const bool atomic_dq = p.dq != nullptr && !p.deterministic_dq;
  if (in.B * in.Hkv * in.Sk > 0 && (p.dk != nullptr || p.dv != nullptr || atomic_dq)) {
    const int64_t blocks =
        in.B * in.Hkv * LRK_GQA_HEAD_DIM_SWITCH(in.D, kD, [&] { return ceil_div(in.Sk, BwdTile<kD>::kKeys); });
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    const unsigned grid = static_cast<unsigned>(blocks);
    LRK_GQA_HEAD_DIM_SWITCH(in.D, kD, [&] {
      bwd_kernel<T, kD><<<grid, kThreads, 0, stream>>>(p);
    });
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.dq != nullptr && p.deterministic_dq && rows > 0) {
    const int64_t blocks =
        in.B * in.Hkv * LRK_GQA_HEAD_DIM_SWITCH(in.D, kD, [&] { return ceil_div(in.G * in.Sq, BwdTile<kD>::kRows); });
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    const unsigned grid = static_cast<unsigned>(blocks);
    LRK_GQA_HEAD_DIM_SWITCH(in.D, kD, [&] {
      dq_kernel<T, kD><<<grid, kThreads, 0, stream>>>(p);
    });
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return cudaSuccess;
  }
  if (atomic_dq && p.dq_acc != nullptr && static_cast<const void*>(p.dq_acc) != p.dq && rows > 0) {
    convert_kernel<T><<<elementwise_blocks(rows * in.D), kThreads, 0, stream>>>(p.dq_acc, static_cast<T*>(p.dq),
                                                                              rows * in.D);
    LRK_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace gqa
}  // namespace lrkernels
