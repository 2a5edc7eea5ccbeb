// The multi-LoRA kernels' block-to-work mapping, run on the host: for random groupings the
// worst-case grid covers every token exactly once with the right adapter, surplus blocks find
// no work, and malformed groupings never yield a position or token outside [0, T).
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "lrkernels/multi_lora_tiles.h"

using namespace lrkernels;
using namespace lrkernels::multi_lora;

template <int TM>
void check_grouping(const std::vector<int32_t>& ids, int64_t L) {
  const int64_t T = static_cast<int64_t>(ids.size());
  // counting sort, as multi_lora_segments produces it (base-only tokens last)
  std::vector<int32_t> order, offsets(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) {
    offsets[l] = static_cast<int32_t>(order.size());
    for (int64_t t = 0; t < T; ++t)
      if (ids[t] == l) order.push_back(static_cast<int32_t>(t));
  }
  offsets[L] = static_cast<int32_t>(order.size());
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0) order.push_back(static_cast<int32_t>(t));
  MultiLoraSegmentsView s;
  s.token_order = order.data();
  s.adapter_offsets = offsets.data();
  s.tokens = T;
  s.num_adapters = L;
  s.r_max = 16;
  const int64_t grid = worst_case_tiles(T, L, TM);
  std::vector<int> seen(T, 0);
  int64_t real_tiles = 0;
  for (int64_t b = 0; b < grid + 3; ++b) {  // a few blocks past the grid must find nothing either
    int64_t l = -1, pos0 = -1;
    int count = -1;
    if (!find_tile<TM>(s, b, l, pos0, count)) continue;
    CHECK(b < grid);
    ++real_tiles;
    CHECK(count >= 1 && count <= TM);
    for (int i = 0; i < TM; ++i) {
      const int64_t t = tile_token(s, pos0, i, count);
      if (i >= count) {
        CHECK(t == -1);
        continue;
      }
      CHECK(t >= 0 && t < T);
      if (t < 0 || t >= T) continue;
      CHECK(ids[t] == l);
      ++seen[t];
    }
  }
  for (int64_t t = 0; t < T; ++t) CHECK(seen[t] == (ids[t] >= 0 ? 1 : 0));
  CHECK(real_tiles <= grid);
}

template <int TM>
void check_malformed(std::mt19937& rng) {
  // garbage offsets (negative, decreasing, past T) and token ids out of range
  const int64_t T = 37, L = 6;
  std::vector<int32_t> order(T), offsets(L + 1);
  std::uniform_int_distribution<int> any(-50, 80);
  for (auto& v : order) v = any(rng);
  for (auto& v : offsets) v = any(rng);
  MultiLoraSegmentsView s;
  s.token_order = order.data();
  s.adapter_offsets = offsets.data();
  s.tokens = T;
  s.num_adapters = L;
  s.r_max = 8;
  for (int64_t b = 0; b < worst_case_tiles(T, L, TM) + 5; ++b) {
    int64_t l, pos0;
    int count;
    if (!find_tile<TM>(s, b, l, pos0, count)) continue;
    CHECK(l >= 0 && l < L && pos0 >= 0 && pos0 + count <= T);
    for (int i = 0; i < TM; ++i) {
      const int64_t t = tile_token(s, pos0, i, count);
      CHECK(t >= -1 && t < T);
    }
  }
}

// The identity grouping of lora_linear (one_adapter_segments: no token_order, no offsets):
// the worst-case grid covers tokens 0..T-1 once each, in order, all on adapter 0.
template <int TM>
void check_identity(int64_t T) {
  const MultiLoraSegmentsView s = one_adapter_segments(T, 16);
  CHECK(s.token_order == nullptr && s.adapter_offsets == nullptr && s.num_adapters == 1 && s.r_max == 16);
  std::vector<int> seen(T, 0);
  int64_t next = 0;
  for (int64_t b = 0; b < worst_case_tiles(T, 1, TM) + 3; ++b) {
    int64_t l = -1, pos0 = -1;
    int count = -1;
    if (!find_tile<TM>(s, b, l, pos0, count)) continue;
    CHECK(l == 0 && pos0 == next && count >= 1 && count <= TM);
    for (int i = 0; i < TM; ++i) {
      const int64_t t = tile_token(s, pos0, i, count);
      if (i >= count) {
        CHECK(t == -1);
        continue;
      }
      CHECK(t == pos0 + i);
      if (t >= 0 && t < T) ++seen[t];
    }
    next = pos0 + count;
  }
  CHECK(next == T);
  for (int64_t t = 0; t < T; ++t) CHECK(seen[t] == 1);
}

int main() {
  std::mt19937 rng(7);
  // many tokens per adapter (prefill), one per adapter (decode), empty, all base, skewed
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t T = std::uniform_int_distribution<int>(0, 300)(rng);
    const int64_t L = std::uniform_int_distribution<int>(1, 70)(rng);
    const int mode = trial % 4;
    std::vector<int32_t> ids(T);
    for (int64_t t = 0; t < T; ++t) {
      if (mode == 0) ids[t] = std::uniform_int_distribution<int>(-1, static_cast<int>(L) - 1)(rng);
      if (mode == 1) ids[t] = static_cast<int32_t>(t % L);
      if (mode == 2) ids[t] = -1;
      if (mode == 3) ids[t] = (t % 7 == 0) ? static_cast<int32_t>(L - 1) : 0;
    }
    check_grouping<16>(ids, L);
    check_grouping<32>(ids, L);
    check_grouping<64>(ids, L);
  }
  for (int64_t T : {0, 1, 15, 16, 17, 64, 65, 300}) {
    check_identity<16>(T);
    check_identity<64>(T);
  }
  for (int trial = 0; trial < 100; ++trial) {
    check_malformed<16>(rng);
    check_malformed<64>(rng);
  }

  // ranks are clamped to [0, r_max]
  int32_t ranks[3] = {-3, 5, 99};
  MultiLoraSegmentsView s;
  s.ranks = ranks;
  s.r_max = 16;
  CHECK(adapter_rank(s, 0) == 0 && adapter_rank(s, 1) == 5 && adapter_rank(s, 2) == 16);

  // column tiles of the expand: slices 80, 24, 0, 300 with TN = 128 -> 1 + 1 + 0 + 3 tiles
  const int64_t starts[5] = {0, 80, 104, 104, 404};
  int64_t slice, n0, n_end;
  int covered[404] = {0};
  int tiles = 0;
  for (int64_t y = 0; y < 10; ++y) {
    if (!find_column_tile<128>(starts, 4, y, slice, n0, n_end)) continue;
    ++tiles;
    CHECK(n0 >= starts[slice] && n0 < n_end && n_end == starts[slice + 1]);
    for (int64_t n = n0; n < n0 + 128 && n < n_end; ++n) ++covered[n];
  }
  CHECK(tiles == 5);
  for (int n = 0; n < 404; ++n) CHECK(covered[n] == 1);

  // the shrink's K split: a multiple of the chunk, covering K, more splits when tiles are few
  const int64_t decode = shrink_k_split(4096, 64, 1, 64, 1024);
  const int64_t prefill = shrink_k_split(4096, 144, 1, 64, 1024);
  CHECK(decode % 64 == 0 && prefill % 64 == 0 && decode <= prefill);
  CHECK((4096 + decode - 1) / decode >= 8);
  CHECK(shrink_k_split(10, 1, 1, 64, 1024) == 64);
  CHECK(shrink_k_split(1, 100000, 3, 64, 1024) == 64);

  if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures);
  else std::printf("multi-LoRA tile mapping OK\n");
  return g_failures ? 1 : 0;
}
