// How the multi-LoRA kernels map grid blocks to work, as host/device functions so the mapping
// is unit-tested on the host (tests/cpp/test_multi_lora_tiles.cpp) as well as used by the
// kernels in multi_lora.cuh.
//
// grid.x enumerates TM-token tiles within the adapters' segments of the grouping: adapter l
// owns ceil(n_l / TM) tiles. The segment sizes n_l live on the device, so the host sizes the
// grid for the worst case (worst_case_tiles) and surplus blocks find no tile and exit. Every
// value read from the grouping is clamped or checked, so malformed metadata can make a block
// skip work but never index outside [0, T).
#pragma once

#include <cstdint>

#include "lrkernels/common/macros.h"
#include "lrkernels/multi_lora_params.h"

namespace lrkernels {
namespace multi_lora {

// Upper bound on the number of TM-token tiles any grouping of `tokens` tokens over
// `num_adapters` adapters produces: each non-empty segment adds at most one partial tile,
// and no tile is empty.
LRK_HOST_DEVICE int64_t worst_case_tiles(int64_t tokens, int64_t num_adapters, int64_t tm) {
  const int64_t nonempty = num_adapters < tokens ? num_adapters : tokens;
  const int64_t bound = (tokens + tm - 1) / tm + nonempty;
  return bound < tokens ? bound : tokens;
}

// Rank of adapter l, clamped to [0, r_max] (ranks are not validated on the device).
LRK_HOST_DEVICE int64_t adapter_rank(const MultiLoraSegmentsView& s, int64_t l) {
  if (s.ranks == nullptr) return s.r_max;
  const int64_t r = s.ranks[l];
  return r < 0 ? 0 : (r > s.r_max ? s.r_max : r);
}

// The one-adapter view of lora_linear: the identity grouping (no device memory), rank r.
LRK_HOST_DEVICE MultiLoraSegmentsView one_adapter_segments(int64_t tokens, int64_t rank) {
  MultiLoraSegmentsView s;
  s.tokens = tokens;
  s.num_adapters = 1;
  s.r_max = rank;
  return s;
}

// adapter_offsets[l] clamped to [0, T]; the identity grouping's offsets are {0, T, T, ...}.
LRK_HOST_DEVICE int64_t clamp_offset(const MultiLoraSegmentsView& s, int64_t l) {
  if (s.adapter_offsets == nullptr) return l == 0 ? 0 : s.tokens;
  const int64_t v = s.adapter_offsets[l];
  return v < 0 ? 0 : (v > s.tokens ? s.tokens : v);
}

// Maps tile number `tile` to (adapter, first sorted position, token count); false when the
// tile is past the batch's real tile count. Segments are taken as [lo, hi) with both ends
// clamped to [0, T] and hi >= lo, so positions always lie in [0, T).
template <int TM>
LRK_HOST_DEVICE bool find_tile(const MultiLoraSegmentsView& s, int64_t tile, int64_t& adapter, int64_t& pos0,
                               int& count) {
  int64_t lo = clamp_offset(s, 0);
  for (int64_t l = 0; l < s.num_adapters; ++l) {
    int64_t hi = clamp_offset(s, l + 1);
    if (hi < lo) hi = lo;
    const int64_t tiles = (hi - lo + TM - 1) / TM;
    if (tile < tiles) {
      adapter = l;
      pos0 = lo + tile * TM;
      const int64_t n = hi - pos0;
      count = static_cast<int>(n < TM ? n : TM);
      return true;
    }
    tile -= tiles;
    lo = hi;
  }
  return false;
}

// Token at sorted position pos0 + i of a tile, or -1 (past the tile, or a bad token id).
LRK_HOST_DEVICE int64_t tile_token(const MultiLoraSegmentsView& s, int64_t pos0, int i, int count) {
  if (i >= count) return -1;
  const int64_t t = s.token_order != nullptr ? s.token_order[pos0 + i] : pos0 + i;
  return (t >= 0 && t < s.tokens) ? t : -1;
}

// Maps column tile `ytile` of the expand to (slice, first column, end of the slice); false
// past the last slice. slice_start has slices + 1 entries.
template <int TN>
LRK_HOST_DEVICE bool find_column_tile(const int64_t* slice_start, int64_t slices, int64_t ytile, int64_t& slice,
                                      int64_t& n0, int64_t& n_end) {
  for (int64_t i = 0; i < slices; ++i) {
    const int64_t width = slice_start[i + 1] - slice_start[i];
    const int64_t tiles = (width + TN - 1) / TN;
    if (ytile < tiles) {
      slice = i;
      n0 = slice_start[i] + ytile * TN;
      n_end = slice_start[i + 1];
      return true;
    }
    ytile -= tiles;
  }
  return false;
}

// K columns per shrink block (a multiple of kc): K is split over grid.y until the grid holds
// about `target_blocks` blocks, which keeps decode (few tokens per adapter, few tiles)
// bandwidth-bound instead of leaving most SMs idle.
LRK_HOST_DEVICE int64_t shrink_k_split(int64_t in_features, int64_t tiles, int64_t slices, int64_t kc,
                                       int64_t target_blocks) {
  const int64_t k_chunks = (in_features + kc - 1) / kc;
  const int64_t per = tiles * slices > 0 ? tiles * slices : 1;
  int64_t splits = (target_blocks + per - 1) / per;
  if (splits > k_chunks) splits = k_chunks;
  if (splits < 1) splits = 1;
  return ((k_chunks + splits - 1) / splits) * kc;
}

}  // namespace multi_lora
}  // namespace lrkernels
