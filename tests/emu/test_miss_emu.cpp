// The Bone / MiSS kernels of miss.cuh (chunk_sum_kernel, tile_kernel, build_balance_kernel,
// build_bat_kernel, through their launchers) run under the host emulator, each checked against a
// float64 reference of the formulas of miss_params.h as the binding (csrc/miss/miss_cuda.cu) and
// the CPU kernels (csrc/miss/miss_cpu.cpp) use them:
//   chunk sum   S[t, k] = Σ_{c ≡ k (mod r)} drop(x)[t, c]                       (float32 out)
//   tile        out[t, c] = drop'[t, c] · g[t, c mod r]                            (x's dtype)
//   balance W'  buf[i, j] = W[o, c] + M[c mod r, o mod cols],  o = o0 + i, c = c0 + j
//   bat W'      buf[i, j] = W[o, c] + M_p[a, b] + Σ_k W[o, q·r + k] M_p[k, b]   (o = p·r + a,
//               c = q·r + b)
// in fp32, fp16 and bf16 (W, x and the outputs; M and S float32), with and without dropout,
// r not dividing in (balance), chunks that start inside the matrix (o0, c0 > 0), and strided W.
#include "emu_check.h"

#include <array>

#include "lrkernels/miss.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

struct Case {
  int64_t tokens, in, out, r, cols;  // cols: M's columns (balance/mini)
  double p;                          // dropout
};

template <typename T>
void run(Checker& check, Random& rng, const Case& c, int k) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "[%s T=%ld in=%ld out=%ld r=%ld cols=%ld p=%.2f]", type_name<T>(), c.tokens, c.in,
                c.out, c.r, c.cols, c.p);
  const std::string config = buf;
  const double tol = tolerance<T>();
  const int64_t T_ = c.tokens, in = c.in, out = c.out, r = c.r;
  const int64_t seed_value = 0x1234567890abLL + k;
  DropoutParams d;
  if (c.p > 0) {
    d.threshold = dropout_threshold(c.p);
    d.keep_scale = dropout_keep_scale(d.threshold);
    d.seed = &seed_value;
  }
  auto keep = [&](int64_t t, int64_t col) -> double {
    if (d.threshold == 0) return 1.0;
    const uint32_t bits = dropout_keep_bits(static_cast<uint64_t>(seed_value), t, col >> 3, d.threshold);
    return ((bits >> (col & 7)) & 1u) ? double(d.keep_scale) : 0.0;
  };

  // chunk sum
  const auto x = rng.tensor<T>(T_ * in, 1.0);
  {
    std::vector<double> want(T_ * r, 0.0);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t col = 0; col < in; ++col) want[t * r + col % r] += to_double(x[t * in + col]) * keep(t, col);
    std::vector<float> s = guarded(std::vector<float>(T_ * r, NAN));
    MissChunkSumParams<T> p;
    p.x = x.data(); p.s = s.data(); p.tokens = T_; p.in = in; p.r = r; p.dropout = d;
    if (miss::launch_chunk_sum(p, nullptr) != cudaSuccess) check.launch_failed("chunk_sum", config);
    check.compare("chunk_sum", config, body(s, T_ * r), want, tolerance<float>() * 4);
    check_guards(check, config, {tail(s, T_ * r)});
  }
  // tile
  {
    const auto g = rng.tensor<float>(T_ * r, 1.0);
    std::vector<double> want(T_ * in);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t col = 0; col < in; ++col) want[t * in + col] = double(g[t * r + col % r]) * keep(t, col);
    std::vector<T> o = guarded(std::vector<T>(T_ * in, from_double<T>(NAN)));
    MissTileParams<T> p;
    p.g = g.data(); p.out = o.data(); p.tokens = T_; p.in = in; p.r = r; p.dropout = d;
    if (miss::launch_tile(p, nullptr) != cudaSuccess) check.launch_failed("tile", config);
    check.compare("tile", config, body(o, T_ * in), want, tol);
    check_guards(check, config, {tail(o, T_ * in)});
  }
  // the W' chunk builders: W with a padded leading dimension, a chunk from (o0, c0)
  const int64_t ldw = in + 3;
  const auto w = rng.tensor<T>(out * ldw, 1.0 / std::sqrt(double(r)));
  const int64_t o0 = out / 3, rows = out - o0;
  {
    const int64_t c0 = in / 4, cols = in - c0;
    const auto m = rng.tensor<float>(r * c.cols, 0.5);
    std::vector<double> want(rows * cols);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t o = o0 + i, col = c0 + j;
        want[i * cols + j] = to_double(w[o * ldw + col]) + double(m[(col % r) * c.cols + o % c.cols]);
      }
    std::vector<T> b = guarded(std::vector<T>(rows * cols, from_double<T>(NAN)));
    MissBuildParams<T> p;
    p.w = w.data(); p.m = m.data(); p.buf = b.data(); p.ldw = ldw; p.r = r; p.cols_m = c.cols;
    p.o0 = o0; p.rows = rows; p.c0 = c0; p.cols = cols;
    if (miss::launch_build(p, false, nullptr) != cudaSuccess) check.launch_failed("build balance", config);
    check.compare("build balance", config, body(b, rows * cols), want, tol);
    check_guards(check, config, {tail(b, rows * cols)});
  }
  if (in % r == 0 && out % r == 0) {
    // bat: whole row blocks from block o0/r, whole column blocks from c0
    const int64_t ob = (out / r) / 2, ro0 = ob * r, brow = out - ro0;
    const int64_t qb = (in / r) / 3, c0 = qb * r, cols = in - c0;
    const auto m = rng.tensor<float>(out * r, 0.4 / std::sqrt(double(r)));  // (out/r, r, r)
    std::vector<double> want(brow * cols);
    for (int64_t i = 0; i < brow; ++i)
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t o = ro0 + i, col = c0 + j;
        const int64_t pb = o / r, a = o % r, q = col / r, bb = col % r;
        const float* mp = m.data() + pb * r * r;
        double acc = to_double(w[o * ldw + col]) + mp[a * r + bb];
        for (int64_t kk = 0; kk < r; ++kk) acc += to_double(w[o * ldw + q * r + kk]) * double(mp[kk * r + bb]);
        want[i * cols + j] = acc;
      }
    std::vector<T> b = guarded(std::vector<T>(brow * cols, from_double<T>(NAN)));
    MissBuildParams<T> p;
    p.w = w.data(); p.m = m.data(); p.buf = b.data(); p.ldw = ldw; p.r = r; p.cols_m = r;
    p.o0 = ro0; p.rows = brow; p.c0 = c0; p.cols = cols;
    if (miss::launch_build(p, true, nullptr) != cudaSuccess) check.launch_failed("build bat", config);
    check.compare("build bat", config, body(b, brow * cols), want, tol);
    check_guards(check, config, {tail(b, brow * cols)});
  }
}

void run_all(Checker& check, Random& rng, const Case& c, int k) {
  switch (k % 3) {
    case 0: run<float>(check, rng, c, k); break;
    case 1: run<half>(check, rng, c, k); break;
    default: run<bf16>(check, rng, c, k); break;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("miss", argc, argv);
  // (tokens, in, out, r, cols, p): r | in and not, r = 1, r = in, mini (cols | out), dropout,
  // an empty batch, a grid of several 256-thread blocks (33 × 96 = 3168 elements).
  const std::vector<Case> base = {
      {7, 16, 8, 4, 8, 0.0},   {5, 18, 12, 4, 12, 0.3}, {3, 10, 10, 10, 10, 0.0}, {4, 7, 5, 1, 5, 0.5},
      {6, 24, 12, 6, 3, 0.2},  {9, 64, 48, 16, 16, 0.0}, {2, 13, 9, 3, 1, 0.1},   {0, 8, 12, 4, 12, 0.3},
      {33, 96, 64, 32, 64, 0.25}, {12, 32, 16, 8, 16, 0.0},
  };
  std::vector<Case> quick, extra;
  int k = 0;
  for (const Case& c : base) quick.push_back(c);
  for (int64_t r : {2, 5, 8})
    for (int64_t t : {1, 17}) extra.push_back({t, 40, 40, r, 40 % r == 0 ? 40 / r : 40, 0.15});
  Random rng(4242);
  for (const Case& c : check.select(quick, extra, 10)) {
    // every dtype on every quick case
    for (int rep = 0; rep < 3; ++rep) run_all(check, rng, c, k * 3 + rep);
    ++k;
  }
  return check.finish();
}
