// The GaLore / Fira step kernels of galore.cuh (moments_kernel, moments_kernel_f64,
// residual_kernel, residual_kernel_f64, through their launchers) run under the host emulator,
// each checked against a float64 reference of the CPU semantics (csrc/galore/galore_cpu.cpp,
// python/lrkernels/reference/galore.py):
//   moments   m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,  N = m / (√v + ε), with N computed
//             from the moments as stored (rounded to the moment dtype);
//   residual  W ← β·W + γ·(G ⊙ s), s per row ((m, 1)) or per column ((1, n)), rounded once
//             to W's dtype.
// Every (moment dtype, grad dtype) pair the CUDA binding dispatches (fp32/bf16 moments ×
// fp32/fp16/bf16 grad) plus float64; the residual in fp32/fp16/bf16/f64 with row and column
// scales.
#include "emu_check.h"

#include <array>

#include "lrkernels/galore.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

enum class DType { f32, f16, bf16, f64 };

struct Hyper {
  double beta1, beta2, eps;
};

// ---- moments ----

struct MomentsCase {
  DType moment, grad;  // moment f64: the float64 kernel (grad f64 too, as the binding converts it)
  int64_t numel;
  Hyper h;
};

template <typename MomentT, typename GradT>
void run_moments(Checker& check, Random& rng, const MomentsCase& c) {
  constexpr bool f64 = std::is_same_v<MomentT, double>;
  static_assert(!f64 || std::is_same_v<GradT, double>, "float64 moments take a float64 gradient");
  const int64_t n = c.numel;
  char buf[200];
  std::snprintf(buf, sizeof buf, "[m=%s g=%s numel=%ld b1=%.3g b2=%.4g eps=%.1g]", type_name<MomentT>(),
                type_name<GradT>(), n, c.h.beta1, c.h.beta2, c.h.eps);
  const std::string config = buf;
  // m and v to the moment dtype's precision; N (fp32, or f64) to its own precision from the
  // moments the kernel stored, so N computed from the unrounded moments is caught even with
  // bf16 moments (a relative difference of up to 2^-8, within the bf16 tolerance)
  const double tol = tolerance<MomentT>();
  const double tol_n = f64 ? tolerance<double>() : tolerance<float>();
  // m ~ N(0, 0.1²), v ~ (0.1·|N(0,1)| + 0.02)² > 0, g ~ N(0, 1): N = O(1)
  std::vector<MomentT> m0(n), v0(n);
  for (int64_t i = 0; i < n; ++i) {
    m0[i] = from_double<MomentT>(0.1 * rng.normal());
    const double sd = 0.1 * std::fabs(rng.normal()) + 0.02;
    v0[i] = from_double<MomentT>(sd * sd);
  }
  const auto g = rng.tensor<GradT>(n, 1.0);
  const auto M0 = to_double(m0), V0 = to_double(v0), G = to_double(g);

  // float64 reference; the stored moments rounded to MomentT, N from those
  std::vector<double> M(n), V(n), N(n);
  for (int64_t i = 0; i < n; ++i) {
    const double mi = c.h.beta1 * M0[i] + (1 - c.h.beta1) * G[i];
    const double vi = c.h.beta2 * V0[i] + (1 - c.h.beta2) * G[i] * G[i];
    M[i] = to_double(from_double<MomentT>(mi));
    V[i] = to_double(from_double<MomentT>(vi));
    N[i] = M[i] / (std::sqrt(V[i]) + c.h.eps);
  }

  // every element of N must be written; a guard tail past each buffer must stay untouched
  using update_t = std::conditional_t<f64, double, float>;
  std::vector<update_t> u(n + kGuard, NAN);
  std::fill(u.begin() + n, u.end(), update_t(kSentinel));
  auto m = guarded(m0), v = guarded(v0);
  if constexpr (f64) {
    const cudaError_t err = galore::launch_moments_f64(m.data(), v.data(), g.data(), u.data(), n, c.h.beta1,
                                                       c.h.beta2, c.h.eps, nullptr);
    if (err != cudaSuccess) check.launch_failed("moments_f64", config);
  } else {
    GaloreMomentsParams p;
    p.exp_avg = m.data(); p.exp_avg_sq = v.data(); p.grad = g.data(); p.update = u.data(); p.numel = n;
    p.beta1 = static_cast<float>(c.h.beta1); p.beta2 = static_cast<float>(c.h.beta2);
    p.eps = static_cast<float>(c.h.eps);
    if (galore::launch_moments<MomentT, GradT>(p, nullptr) != cudaSuccess) check.launch_failed("moments", config);
  }
  check.compare("exp_avg", config, body(m, n), M, tol);
  check.compare("exp_avg_sq", config, body(v, n), V, tol);
  check.compare("N", config, body(u, n), N, tol);  // against the reference's own moments
  std::vector<double> N_stored(n);                 // from the kernel's stored moments
  for (int64_t i = 0; i < n; ++i)
    N_stored[i] = to_double(m[i]) / (std::sqrt(to_double(v[i])) + static_cast<update_t>(c.h.eps));
  check.compare("N (stored moments)", config, body(u, n), N_stored, tol_n);
  check_guards(check, config, {tail(m, n), tail(v, n), tail(u, n)});
}

template <typename MomentT>
void dispatch_grad(Checker& check, Random& rng, const MomentsCase& c) {
  switch (c.grad) {
    case DType::f32: run_moments<MomentT, float>(check, rng, c); break;
    case DType::f16: run_moments<MomentT, half>(check, rng, c); break;
    case DType::bf16: run_moments<MomentT, bf16>(check, rng, c); break;
    case DType::f64: break;
  }
}

void run_moments_case(Checker& check, Random& rng, const MomentsCase& c) {
  switch (c.moment) {
    case DType::f32: dispatch_grad<float>(check, rng, c); break;
    case DType::bf16: dispatch_grad<bf16>(check, rng, c); break;
    case DType::f64: run_moments<double, double>(check, rng, c); break;
    case DType::f16: break;  // not a moment dtype
  }
}

// Every numel with every (moment, grad) pair, the hyper-parameters rotating over them.
std::vector<MomentsCase> moments_cases(const std::vector<int64_t>& sizes) {
  const std::array<std::array<DType, 2>, 7> pairs = {{{DType::f32, DType::f32},
                                                      {DType::f32, DType::f16},
                                                      {DType::f32, DType::bf16},
                                                      {DType::bf16, DType::f32},
                                                      {DType::bf16, DType::f16},
                                                      {DType::bf16, DType::bf16},
                                                      {DType::f64, DType::f64}}};
  const std::array<Hyper, 3> hypers = {{{0.9, 0.999, 1e-6}, {0.5, 0.9, 1e-3}, {0.0, 0.0, 1e-8}}};
  std::vector<MomentsCase> cases;
  int k = 0;
  for (int64_t n : sizes)
    for (const auto& [mt, gt] : pairs) cases.push_back({mt, gt, n, hypers[k++ % hypers.size()]});
  return cases;
}

// ---- residual ----

struct ResidualCase {
  DType dtype;
  int64_t rows, cols;
  bool row_scale;
  double beta, gamma;
};

template <typename T>
void run_residual(Checker& check, Random& rng, const ResidualCase& c) {
  constexpr bool f64 = std::is_same_v<T, double>;
  using scale_t = std::conditional_t<f64, double, float>;  // the binding's residual_scale dtype
  const int64_t R = c.rows, C = c.cols;
  char buf[200];
  std::snprintf(buf, sizeof buf, "[%s %ldx%ld %s beta=%.3g gamma=%.3g]", type_name<T>(), R, C,
                c.row_scale ? "row-scale" : "col-scale", c.beta, c.gamma);
  const std::string config = buf;
  const double tol = tolerance<T>();
  const auto w0 = rng.tensor<T>(R * C, 1.0), g = rng.tensor<T>(R * C, 1.0);
  const int64_t ns = c.row_scale ? R : C;
  std::vector<scale_t> s(ns);
  for (scale_t& e : s) e = static_cast<scale_t>(std::fabs(rng.normal()) + 0.1);
  const auto W0 = to_double(w0), G = to_double(g);

  std::vector<double> W(R * C);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j) {
      const double sv = static_cast<double>(s[c.row_scale ? r : j]);
      W[r * C + j] = to_double(from_double<T>(c.beta * W0[r * C + j] + c.gamma * sv * G[r * C + j]));
    }

  auto w = guarded(w0);
  cudaError_t err;
  if constexpr (f64) {
    err = galore::launch_residual_f64(w.data(), g.data(), s.data(), R, C, c.row_scale, c.beta, c.gamma, nullptr);
  } else {
    GaloreResidualParams p;
    p.weight = w.data(); p.grad = g.data(); p.scale = s.data(); p.rows = R; p.cols = C; p.row_scale = c.row_scale;
    p.beta = static_cast<float>(c.beta); p.gamma = static_cast<float>(c.gamma);
    err = galore::launch_residual<T>(p, nullptr);
  }
  if (err != cudaSuccess) check.launch_failed("residual", config);
  check.compare("weight", config, body(w, R * C), W, tol);
  check_guards(check, config, {tail(w, R * C)});
}

void run_residual_case(Checker& check, Random& rng, const ResidualCase& c) {
  switch (c.dtype) {
    case DType::f32: run_residual<float>(check, rng, c); break;
    case DType::f16: run_residual<half>(check, rng, c); break;
    case DType::bf16: run_residual<bf16>(check, rng, c); break;
    case DType::f64: run_residual<double>(check, rng, c); break;
  }
}

// Every shape in every dtype with row and with column scales.
std::vector<ResidualCase> residual_cases(const std::vector<std::array<int64_t, 2>>& shapes) {
  std::vector<ResidualCase> cases;
  int k = 0;
  for (const auto& [R, C] : shapes)
    for (bool row : {true, false})
      for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::f64}) {
        const double beta = k % 3 == 0 ? 1.0 : 0.9, gamma = k % 2 ? 0.5 : -1.25;
        cases.push_back({dt, R, C, row, beta, gamma});
        ++k;
      }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("galore", argc, argv);
  // numel: empty, one element, tails of a 256-thread block (255, 257), several blocks with a
  // tail. The negative control takes the first 2 sizes' worth (every pair at numel 1 and 7).
  const auto moments_quick = moments_cases({1, 7, 0, 255, 256, 257, 1001});
  const auto moments_extra = moments_cases({3, 4099, 70001});
  // (rows, cols): 1x1 (row and column scales have the same shape), column tails of one and of
  // two 256-column blocks, a single row / column, empty matrices.
  const auto residual_quick = residual_cases({{1, 1}, {3, 300}, {37, 5}, {130, 257}, {1, 513}, {300, 1}, {0, 5}, {5, 0}});
  const auto residual_extra = residual_cases({{17, 1000}, {2, 1300}, {600, 33}});
  Random rng(2024);
  for (const MomentsCase& c : check.select(moments_quick, moments_extra, 14)) run_moments_case(check, rng, c);
  for (const ResidualCase& c : check.select(residual_quick, residual_extra, 16)) run_residual_case(check, rng, c);
  return check.finish();
}
