// lora_linear's tensor-core shrink and expand, i.e. those of multi_lora_tc.cuh (fp16/bf16,
// WMMA) in their one-adapter case as csrc/lora/lora_cuda.cu launches them (identity grouping,
// scalar scale, rank_scale / out_scale as adapter 0's gains), run under the host emulator and
// checked against a float64 reference of the CPU semantics (csrc/lora/lora_cpu.cpp); next to
// them, the SIMT shrink through the same launcher (use_tensor_cores = false), and the
// tensor-core shrink's output fed to the tensor-core expand. Covers tails of the 64-token /
// 64-column / 16-lane tiles, every rank-chunk width, unaligned x and A, dropout, gates and
// output scales, and K split over blocks (atomics) or not (deterministic mode).
#include "emu_check.h"

#include "lrkernels/multi_lora.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

// Whether the latest launch was one of multi_lora_tc.cuh's tensor-core kernels.
template <typename T>
bool last_launch_was_tensor_cores() {
  const void* k = emu::last_kernel();
  auto is = [k](auto* kernel) { return k == reinterpret_cast<const void*>(kernel); };
  return is(&multi_lora::shrink_tc_kernel<T, 16, false>) || is(&multi_lora::shrink_tc_kernel<T, 32, false>) ||
         is(&multi_lora::shrink_tc_kernel<T, 64, false>) || is(&multi_lora::shrink_tc_kernel<T, 16, true>) ||
         is(&multi_lora::shrink_tc_kernel<T, 32, true>) || is(&multi_lora::shrink_tc_kernel<T, 64, true>) ||
         is(&multi_lora::expand_tc_kernel<T, 16, false, false>) ||
         is(&multi_lora::expand_tc_kernel<T, 16, false, true>) ||
         is(&multi_lora::expand_tc_kernel<T, 16, true, false>) ||
         is(&multi_lora::expand_tc_kernel<T, 16, true, true>) ||
         is(&multi_lora::expand_tc_kernel<T, 32, false, false>) ||
         is(&multi_lora::expand_tc_kernel<T, 32, false, true>) ||
         is(&multi_lora::expand_tc_kernel<T, 32, true, false>) ||
         is(&multi_lora::expand_tc_kernel<T, 32, true, true>);
}

// The dispatcher's reported path must be `want`, and a launch it made must be that path's.
template <typename T>
void check_path(Checker& check, const char* what, const std::string& config, bool want, bool ran, long before) {
  check.expect(ran == want, what, config, want ? "did not take the tensor cores" : "took the tensor cores");
  if (emu::launch_count() != before)
    check.expect(last_launch_was_tensor_cores<T>() == want, what, config, "launched the other path's kernel");
}

struct Case {
  bool bf16;
  int64_t tokens, in, out, rank;
  bool rank_scale, out_scale;
  double dropout_p;
  float scale;
  bool allow_k_split;  // shrink: the launcher may split K over blocks (false: deterministic mode)
  int offset;       // x and A start `offset` elements into 32-byte-aligned buffers
};

// Without allow_k_split the shrink's grid has one K range (deterministic mode); with it, the
// decode-like case (few tokens, wide input) must split.
void check_split(Checker& check, const char* what, const std::string& config, const Case& c, long before) {
  if (emu::launch_count() == before) return;
  const unsigned splits = emu::last_grid().y;
  if (!c.allow_k_split) check.expect(splits == 1, what, config, "split K though allow_k_split is false");
  if (c.allow_k_split && c.tokens <= 64 && c.in >= 4096) check.expect(splits > 1, what, config, "did not split K");
}

template <typename T>
void run(Checker& check, Random& rng, const Case& c) {
  const int64_t T_ = c.tokens, in = c.in, out = c.out, r = c.rank;
  char buf[240];
  std::snprintf(buf, sizeof buf, "[%s T=%ld in=%ld out=%ld r=%ld g=%d o=%d p=%.2f s=%.2f split=%d offset=%d]",
                type_name<T>(), T_, in, out, r, c.rank_scale, c.out_scale, c.dropout_p, c.scale, c.allow_k_split,
                c.offset);
  const std::string config = buf;
  const double tol = tolerance<T>();
  // std::vector's allocation is at least 16-byte aligned; 32-byte alignment is not needed
  // for global memory (the WMMA tiles live in shared memory), offset 1 breaks 16 bytes.
  const auto x_buf = rng.tensor<T>(T_ * in + 16, 1.0);
  const auto a_buf = rng.tensor<T>(r * in + 16, 1 / std::sqrt(double(std::max<int64_t>(in, 1))));
  const T* x = x_buf.data() + c.offset;
  const T* a = a_buf.data() + c.offset;
  const auto b = rng.tensor<T>(out * r, 1 / std::sqrt(double(r)));
  const auto g = rng.tensor<T>(r, 1.0), o = rng.tensor<T>(out, 1.0), y0 = rng.tensor<T>(T_ * out, 1.0);
  const auto B = to_double(b), G = to_double(g), O = to_double(o);
  int64_t seed = 0x5DEECE66DLL * 977;
  DropoutParams dropout;
  if (c.dropout_p > 0) {
    dropout.threshold = dropout_threshold(c.dropout_p);
    dropout.keep_scale = dropout_keep_scale(dropout.threshold);
    dropout.seed = &seed;
  }

  // float64 reference: u = drop(x) Aᵀ, y = y0 + ((s g ⊙ u) Bᵀ) ⊙ o
  std::vector<double> U(T_ * r), Y = to_double(y0);
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) {
        double v = to_double(x[t * in + k]);
        if (dropout.threshold) {
          const uint32_t bits = dropout_keep_bits(static_cast<uint64_t>(seed), t, k >> 3, dropout.threshold);
          v = ((bits >> (k & 7)) & 1u) ? v * dropout.keep_scale : 0.0;
        }
        acc += v * to_double(a[j * in + k]);
      }
      U[t * r + j] = acc;
    }
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t n = 0; n < out; ++n) {
      double acc = 0;
      for (int64_t j = 0; j < r; ++j) acc += U[t * r + j] * c.scale * (c.rank_scale ? G[j] : 1.0) * B[n * r + j];
      Y[t * out + n] += acc * (c.out_scale ? O[n] : 1.0);
    }

  // tensor-core shrink: hidden zero-filled, as the binding does (the kernel adds into it)
  const MultiLoraSegmentsView seg = multi_lora::one_adapter_segments(T_, r);
  std::vector<float> hidden(T_ * r, 0.f);
  MultiLoraShrinkParams sp;
  sp.x = x; sp.a = a; sp.hidden = hidden.data();
  sp.in_features = in; sp.dropout = dropout; sp.allow_k_split = c.allow_k_split; sp.seg = seg;
  sp.use_tensor_cores = true;
  bool ran = false;
  long before = emu::launch_count();
  if (multi_lora::launch_shrink<T>(sp, nullptr, &ran) != cudaSuccess) check.launch_failed("shrink tc", config);
  check_path<T>(check, "shrink tc path", config, true, ran, before);
  check_split(check, "shrink tc grid", config, c, before);
  check.compare("hidden-tc", config, hidden, U, tol);

  // the SIMT shrink through the same launcher, same inputs
  std::vector<float> hidden_simt(T_ * r, 0.f);
  sp.hidden = hidden_simt.data();
  sp.use_tensor_cores = false;
  before = emu::launch_count();
  if (multi_lora::launch_shrink<T>(sp, nullptr, &ran) != cudaSuccess) check.launch_failed("shrink simt", config);
  check_path<T>(check, "shrink simt path", config, false, ran, before);
  check_split(check, "shrink simt grid", config, c, before);
  check.compare("hidden-simt", config, hidden_simt, U, tol);

  // tensor-core expand from the reference u
  const std::vector<float> u_ref(U.begin(), U.end());
  auto y = y0;
  MultiLoraExpandParams ep;
  ep.hidden = u_ref.data(); ep.b = b.data(); ep.y = y.data(); ep.ldy = out; ep.out_total = out;
  ep.slice_start[1] = out; ep.seg = seg; ep.use_tensor_cores = true;
  ep.rank_scale = c.rank_scale ? g.data() : nullptr; ep.out_scale = c.out_scale ? o.data() : nullptr;
  ep.scale = c.scale;
  before = emu::launch_count();
  if (multi_lora::launch_expand<T>(ep, nullptr, &ran) != cudaSuccess) check.launch_failed("expand tc", config);
  check_path<T>(check, "expand tc path", config, true, ran, before);
  check.compare("y-tc", config, y, Y, tol);

  // tensor-core shrink output into the tensor-core expand
  auto y_chain = y0;
  ep.hidden = hidden.data();
  ep.y = y_chain.data();
  if (multi_lora::launch_expand<T>(ep, nullptr) != cudaSuccess) check.launch_failed("expand tc chain", config);
  check.compare("y-tc-chain", config, y_chain, Y, tol);

  // the same x with the adapters in fp32 (a PEFT-style mixed layer), tensor cores requested:
  // the dispatchers take the SIMT kernels (the WMMA tiles take no fp32 operand); A, B, g, o
  // here are exactly the 16-bit values above, so the reference is unchanged
  auto widen = [](const T* p, int64_t n) {
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(to_double(p[i]));
    return v;
  };
  const auto a32 = widen(a, r * in), b32 = widen(b.data(), out * r), g32 = widen(g.data(), r),
             o32 = widen(o.data(), out);
  std::vector<float> hidden_mixed(T_ * r, 0.f);
  sp.a = a32.data();
  sp.hidden = hidden_mixed.data();
  sp.use_tensor_cores = true;
  before = emu::launch_count();
  if (multi_lora::launch_shrink<T, float>(sp, nullptr, &ran) != cudaSuccess)
    check.launch_failed("shrink fp32 adapters", config);
  check_path<T>(check, "shrink fp32-adapter path", config, false, ran, before);
  check.compare("hidden-fp32-adapters", config, hidden_mixed, U, tol);
  auto y_mixed = y0;
  ep.hidden = u_ref.data();
  ep.y = y_mixed.data();
  ep.b = b32.data();
  ep.rank_scale = c.rank_scale ? g32.data() : nullptr;
  ep.out_scale = c.out_scale ? o32.data() : nullptr;
  before = emu::launch_count();
  if (multi_lora::launch_expand<T, float>(ep, nullptr, &ran) != cudaSuccess)
    check.launch_failed("expand fp32 adapters", config);
  check_path<T>(check, "expand fp32-adapter path", config, false, ran, before);
  check.compare("y-fp32-adapters", config, y_mixed, Y, tol);
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("lora (tensor cores, the one-adapter multi-LoRA kernels)", argc, argv);
  // A grid of T × in × out × r, rotating dtype, gates, dropout and alignment over its points;
  // the quick run takes every 7th point (96 of 672), the full run all of them.
  const std::vector<int64_t> token_counts = {0, 1, 7, 64, 65, 130};
  const std::vector<int64_t> features = {1, 9, 16, 130};
  const std::vector<int64_t> ranks = {1, 3, 16, 19, 64, 100, 256};
  std::vector<Case> quick, extra;
  int n = 0;
  for (int64_t T_ : token_counts)
    for (int64_t in : features)
      for (int64_t out : features)
        for (int64_t r : ranks) {
          ++n;
          const Case c{n % 2 == 0, T_, in, out, r, n % 2 == 1, (n / 2) % 2 == 1, (n / 4) % 2 ? 0.3 : 0.0,
                       n % 3 ? 0.7f : 1.3f, n % 3 != 1, n % 5 == 0 ? 1 : 0};
          (n % 7 == 0 ? quick : extra).push_back(c);
        }
  // Both dtypes × dropout × gates at tensor-core-sized shapes (every rank-chunk width of the
  // expand: 16, 32, 64), and K split over 2-10 blocks, aligned and not.
  std::vector<Case> fixed;
  for (double p : {0.0, 0.3})
    for (int gates = 0; gates < 4; ++gates) {
      fixed.push_back({false, 130, 130, 130, 19, (gates & 1) != 0, (gates & 2) != 0, p, 0.7f, true, 0});
      fixed.push_back({true, 65, 136, 9, 100, (gates & 1) != 0, (gates & 2) != 0, p, 0.5f, false, 0});
    }
  for (bool split : {true, false}) {
    fixed.push_back({false, 70, 520, 33, 40, true, true, 0.3, 1.f, split, 0});
    fixed.push_back({true, 70, 521, 33, 130, false, true, 0.3, 1.f, split, 1});
    fixed.push_back({true, 3, 600, 16, 3, true, false, 0.0, 1.f, split, 0});
  }
  // a decode-like shape (64 tokens, in = 4096): the launcher splits K over many blocks
  fixed.push_back({false, 64, 4096, 64, 16, true, true, 0.3, 1.f, true, 0});
  quick.insert(quick.begin(), fixed.begin(), fixed.end());
  Random rng(4321);
  for (const Case& c : check.select(quick, extra, 4)) {
    if (c.bf16) run<bf16>(check, rng, c);
    else run<half>(check, rng, c);
  }
  return check.finish();
}
