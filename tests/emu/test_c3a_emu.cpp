// The C³A frequency-domain kernels of c3a.cuh (contract_kernel through launch_contract<false>
// and <true>, kernel_grad_kernel through launch_kernel_grad) run under the host emulator on
// random complex spectra (no FFT: the kernels only see spectra), each checked against a
// float64 reference of the frequency-domain formulas of c3a_params.h as the binding
// (csrc/c3a/c3a_cuda.cu) uses them, and as csrc/c3a/c3a_cpu.cpp computes them. For a layer with
// Q = in/b input blocks, P = out/b output blocks and F = b/2+1 frequencies, K̂ (P, Q, F):
//   forward      launch_contract<false>, n_in = Q, n_out = P:
//                Y[t, p, f]  = s · Σ_q X̂[t, q, f] · conj(K̂[p, q, f]) + c · bias[p, f]
//   input grad   launch_contract<true>, n_in = P, n_out = Q, the same K̂:
//                DX[t, q, f] = s · Σ_p Ĝ[t, p, f] · K̂[p, q, f] (+ c · bias[q, f]; the binding
//                passes no bias here, the kernel takes one like the forward)
//   kernel grad  launch_kernel_grad, n_out = P, n_in = Q:
//                DK[p, q, f] += s · Σ_t conj(Ĝ[t, p, f]) · X̂[t, q, f]   (atomics over token slices)
// All spectra complex fp32, interleaved (re, im), row-major.
#include "emu_check.h"

#include <array>
#include <complex>

#include "lrkernels/c3a.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

using cd = std::complex<double>;

struct Case {
  int64_t tokens, n_in, n_out, freqs;  // n_in = Q, n_out = P of the layer
  bool bias;
  float scale, bias_scale;
  bool grad_accumulate;  // the kernel-gradient buffer starts non-zero (its += semantics)
  bool contract = true;  // run the two contractions (else the kernel gradient only)
};

// n complex values, re and im ~ N(0, scale²), as interleaved floats
std::vector<float> spectrum(Random& rng, int64_t n, double scale) { return rng.tensor<float>(2 * n, scale); }

cd at(const std::vector<float>& v, int64_t i) { return cd(v[2 * i], v[2 * i + 1]); }

void put(std::vector<double>& v, int64_t i, cd z) {
  v[2 * i] = z.real();
  v[2 * i + 1] = z.imag();
}

void run(Checker& check, Random& rng, const Case& c) {
  const int64_t T_ = c.tokens, Q = c.n_in, P = c.n_out, F = c.freqs;
  char buf[200];
  std::snprintf(buf, sizeof buf, "[T=%ld Q=%ld P=%ld F=%ld bias=%d s=%.3g c=%.3g acc=%d]", T_, Q, P, F, c.bias,
                c.scale, c.bias_scale, c.grad_accumulate);
  const std::string config = buf;
  const double tol = tolerance<float>();
  const auto x = spectrum(rng, T_ * Q * F, 1.0);                                  // X̂ (T, Q, F)
  const auto gy = spectrum(rng, T_ * P * F, 1.0);                                 // Ĝ (T, P, F)
  const auto k = spectrum(rng, P * Q * F, 1 / std::sqrt(double(std::max(P, Q))));  // K̂ (P, Q, F)
  const auto bias_p = spectrum(rng, P * F, 1.0), bias_q = spectrum(rng, Q * F, 1.0);
  auto K = [&](int64_t p, int64_t q, int64_t f) { return at(k, (p * Q + q) * F + f); };

  if (c.contract) {
    // forward: out (T, P, F)
    std::vector<double> Y(2 * T_ * P * F);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t f = 0; f < F; ++f) {
          cd acc = 0;
          for (int64_t q = 0; q < Q; ++q) acc += at(x, (t * Q + q) * F + f) * std::conj(K(p, q, f));
          cd y = double(c.scale) * acc;
          if (c.bias) y += double(c.bias_scale) * at(bias_p, p * F + f);
          put(Y, (t * P + p) * F + f, y);
        }
    // every element must be written (NaN before), nothing past the end (guard tail)
    std::vector<float> y = guarded(std::vector<float>(2 * T_ * P * F, NAN));
    C3AContractParams fp;
    fp.in = x.data(); fp.kernel_fft = k.data(); fp.bias_fft = c.bias ? bias_p.data() : nullptr; fp.out = y.data();
    fp.tokens = T_; fp.n_in = Q; fp.n_out = P; fp.freqs = F; fp.scale = c.scale; fp.bias_scale = c.bias_scale;
    if (c3a::launch_contract<false>(fp, nullptr) != cudaSuccess) check.launch_failed("contract forward", config);
    check.compare("forward", config, body(y, 2 * T_ * P * F), Y, tol);
    check_guards(check, config, {tail(y, 2 * T_ * P * F)});

    // input gradient: out (T, Q, F) from Ĝ (T, P, F) and the same K̂ (P, Q, F)
    std::vector<double> DX(2 * T_ * Q * F);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t f = 0; f < F; ++f) {
          cd acc = 0;
          for (int64_t p = 0; p < P; ++p) acc += at(gy, (t * P + p) * F + f) * K(p, q, f);
          cd d = double(c.scale) * acc;
          if (c.bias) d += double(c.bias_scale) * at(bias_q, q * F + f);
          put(DX, (t * Q + q) * F + f, d);
        }
    std::vector<float> dx = guarded(std::vector<float>(2 * T_ * Q * F, NAN));
    C3AContractParams tp;
    tp.in = gy.data(); tp.kernel_fft = k.data(); tp.bias_fft = c.bias ? bias_q.data() : nullptr; tp.out = dx.data();
    tp.tokens = T_; tp.n_in = P; tp.n_out = Q; tp.freqs = F; tp.scale = c.scale; tp.bias_scale = c.bias_scale;
    if (c3a::launch_contract<true>(tp, nullptr) != cudaSuccess) check.launch_failed("contract transposed", config);
    check.compare("transposed", config, body(dx, 2 * T_ * Q * F), DX, tol);
    check_guards(check, config, {tail(dx, 2 * T_ * Q * F)});
  }

  // kernel gradient: (P, Q, F), accumulated onto its initial contents
  const float grad_scale = c.scale / static_cast<float>(std::sqrt(double(std::max<int64_t>(T_, 1))));
  std::vector<float> dk =
      guarded(c.grad_accumulate ? spectrum(rng, P * Q * F, 1.0) : std::vector<float>(2 * P * Q * F, 0.f));
  std::vector<double> DK(2 * P * Q * F);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t f = 0; f < F; ++f) {
        cd acc = 0;
        for (int64_t t = 0; t < T_; ++t) acc += std::conj(at(gy, (t * P + p) * F + f)) * at(x, (t * Q + q) * F + f);
        const int64_t i = (p * Q + q) * F + f;
        put(DK, i, at(dk, i) + double(grad_scale) * acc);
      }
  C3AKernelGradParams gp;
  gp.grad_fft = gy.data(); gp.x_fft = x.data(); gp.grad_kernel_fft = dk.data();
  gp.tokens = T_; gp.n_out = P; gp.n_in = Q; gp.freqs = F; gp.scale = grad_scale;
  if (c3a::launch_kernel_grad(gp, nullptr) != cudaSuccess) check.launch_failed("kernel_grad", config);
  check.compare("kernel_grad", config, body(dk, 2 * P * Q * F), DK, tol);
  check_guards(check, config, {tail(dk, 2 * P * Q * F)});
}

constexpr std::array<int64_t, 7> kBlocks = {1, 2, 3, 4, 5, 8, 9};      // n_in, n_out
constexpr std::array<int64_t, 6> kFreqs = {1, 2, 3, 5, 9, 129};        // b = 1, 2, 4, 8, 16, 256
constexpr std::array<int64_t, 6> kTokens = {0, 1, 3, 4, 5, 17};

Case make_case(int64_t T_, int64_t Q, int64_t P, int64_t F, int k) {
  const float scale = k % 3 == 0 ? 1.0f : (k % 3 == 1 ? 0.7f : 1.3f);
  const float bias_scale = (k / 2) % 2 ? 0.5f : 1.0f;  // 0.5 and 1 among the cases with a bias
  return {T_, Q, P, F, k % 2 == 0, scale, bias_scale, k % 4 >= 2};
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("c3a", argc, argv);
  // Quick: each of the 49 (n_in, n_out) pairs once; F and tokens rotate so that the first 36
  // cases hold every (F, tokens) pair; bias, scales and the accumulate flag rotate too.
  // n_out 1/2/3-4/5-9 reach OC = 1/2/4/8 (9: two output chunks), tokens 3/4/5/17 the tails
  // of the 4-token groups, F = 129 several 256-thread blocks.
  std::vector<Case> quick, extra;
  for (int k = 0; k < 49; ++k) {
    const int64_t Q = kBlocks[k / 7], P = kBlocks[k % 7];
    const int64_t F = kFreqs[k % 6], T_ = kTokens[(k % 6 + k / 6) % 6];
    quick.push_back(make_case(T_, Q, P, F, k));
  }
  // The kernel gradient's token slices (at least 16 tokens each, up to ~1024 blocks): 2, 3,
  // 4 and 7 slices, uneven last slices, with one and several blocks in x.
  int k = 0;
  for (const auto& [T_, Q, P, F] : std::vector<std::array<int64_t, 4>>{
           {33, 3, 5, 9}, {50, 9, 9, 129}, {100, 2, 3, 5}, {100, 8, 4, 129}, {40, 1, 1, 1}, {65, 5, 9, 3}}) {
    Case c = make_case(T_, Q, P, F, k++);
    c.contract = k % 2 == 0;
    quick.push_back(c);
  }
  // Full: the whole grid, n_in × n_out × F × tokens, bias rotating.
  k = 0;
  for (int64_t Q : kBlocks)
    for (int64_t P : kBlocks)
      for (int64_t F : kFreqs)
        for (int64_t T_ : kTokens) extra.push_back(make_case(T_, Q, P, F, k++));
  Random rng(31337);
  for (const Case& c : check.select(quick, extra, 14)) run(check, rng, c);
  return check.finish();
}
