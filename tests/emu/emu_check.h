// Shared harness of the emulator tests: random inputs in fp32/fp16/bf16/f64, the comparison of a
// kernel's output with a float64 reference, the case selection (quick / full), and the
// negative control, and guard tails that catch writes past the end of an output buffer.
//
// Comparison: with e = got - want, n elements and rms = max(RMS(want), 0.1), a check fails
// when ||e||_2 > tol * sqrt(n) * rms (the norm-wise relative error exceeds tol), when any
// |e_i| > 4 * tol * max(rms, |want_i|) (one element is far off, which the norm-wise test alone
// would miss in a large output; large elements get their own rounding), or when got holds a
// NaN/Inf. The inputs are scaled so that outputs are O(1); the 0.1 floor keeps an output of
// one or a few elements that cancels to near zero from failing on rounding errors, which
// scale with the terms of its sums, not with its value (and sets the bound for all-zero
// outputs, such as the hidden rows of base-only tokens).
//
// Negative control (--negative-control): every non-empty reference is perturbed before the
// comparison, alternately with its largest element moved by 8 * tol * max(rms, |want_i|)
// (only the element test can see it in a large output) and with every element moved by
// +-2 * tol * rms (only the norm-wise test can see it), and the run passes only if every
// perturbed check failed. So the suite cannot pass by comparing nothing, or with a tolerance
// that no longer bites.
#pragma once

#include "emu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace emu_check {

using bf16 = __nv_bfloat16;
using half = __half;

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, double>) return "f64";
  else if constexpr (std::is_same_v<T, half>) return "f16";
  else return "bf16";
}

// Tolerance of the norm-wise relative error: fp32 kernels accumulate in fp32; fp16/bf16
// outputs (and operands rounded to 16 bits inside the tensor-core kernels) lose more;
// float64 kernels (the reference-run paths) are held to double rounding.
template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, float>) return static_cast<float>(v);
  else if constexpr (std::is_same_v<T, double>) return v;
  else if constexpr (std::is_same_v<T, half>) return __float2half_rn(static_cast<float>(v));
  else return __float2bfloat16_rn(static_cast<float>(v));
}
inline double to_double(double v) { return v; }
inline double to_double(float v) { return v; }
inline double to_double(half v) { return __half2float(v); }
inline double to_double(bf16 v) { return __bfloat162float(v); }

template <typename T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_double(v[i]);
  return out;
}

class Random {
 public:
  explicit Random(uint64_t seed) : engine_(seed) {}
  double normal() { return normal_(engine_); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(engine_); }
  // n values ~ N(0, scale^2), rounded to T
  template <typename T>
  std::vector<T> tensor(size_t n, double scale) {
    std::vector<T> v(n);
    for (T& e : v) e = from_double<T>(normal() * scale);
    return v;
  }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<double> normal_;
};

class Checker {
 public:
  Checker(const char* suite, int argc, char** argv) : suite_(suite) {
    for (int i = 1; i < argc; ++i) {
      if (std::strcmp(argv[i], "--negative-control") == 0) {
        negative_ = true;
      } else if (std::strcmp(argv[i], "--full") == 0) {
        full_ = true;
      } else {
        std::fprintf(stderr, "usage: %s [--full] [--negative-control]\n  LRK_EMU_FULL=1 is --full\n", argv[0]);
        std::exit(2);
      }
    }
    const char* env = std::getenv("LRK_EMU_FULL");
    if (env != nullptr && std::strcmp(env, "") != 0 && std::strcmp(env, "0") != 0) full_ = true;
  }

  bool negative_control() const { return negative_; }
  bool full() const { return full_; }

  // The cases to run: `quick` (the default), `quick` then `extra` (full), or the first
  // `negative_cases` of `quick` (negative control: enough to reach every kernel and dtype).
  template <typename Case>
  std::vector<Case> select(const std::vector<Case>& quick, const std::vector<Case>& extra,
                           size_t negative_cases) const {
    std::vector<Case> cases = quick;
    if (negative_) cases.resize(std::min(negative_cases, cases.size()));
    else if (full_) cases.insert(cases.end(), extra.begin(), extra.end());
    return cases;
  }

  void compare(const char* what, const std::string& config, const std::vector<double>& got,
               std::vector<double> want, double tol) {
    ++checks_;
    if (got.size() != want.size()) {
      report_failure(what, config, "size mismatch");
      return;
    }
    const size_t n = want.size();
    if (n == 0) {
      ++empty_checks_;
      return;
    }
    double sum_sq = 0;
    for (double w : want) sum_sq += w * w;
    const double rms = std::max(std::sqrt(sum_sq / static_cast<double>(n)), 0.1);
    if (negative_) perturb(want, rms, tol);
    double err_sq = 0, max_ratio = 0;  // max_ratio: the worst |e_i| / its bound, <= 1 passes
    size_t worst = 0;
    bool finite = true;
    for (size_t i = 0; i < n; ++i) {
      const double e = std::fabs(got[i] - want[i]);
      if (!std::isfinite(got[i])) {
        finite = false;
        worst = i;
        break;
      }
      err_sq += e * e;
      const double ratio = e / (4 * tol * std::max(rms, std::fabs(want[i])));
      if (ratio > max_ratio) {
        max_ratio = ratio;
        worst = i;
      }
    }
    const double norm_ratio = std::sqrt(err_sq / static_cast<double>(n)) / (tol * rms);  // <= 1 passes
    const bool pass = finite && norm_ratio <= 1 && max_ratio <= 1;
    if (negative_) {
      ++perturbed_checks_;
      if (pass) {
        ++undetected_;
        std::printf("UNDETECTED perturbation: %s %s (norm %.3g, max %.3g of the bounds)\n", what, config.c_str(),
                    norm_ratio, max_ratio);
      }
      return;
    }
    worst_norm_ratio_ = std::max(worst_norm_ratio_, finite ? norm_ratio : INFINITY);
    worst_max_ratio_ = std::max(worst_max_ratio_, finite ? max_ratio : INFINITY);
    if (!pass) {
      char detail[200];
      std::snprintf(detail, sizeof detail, "norm err %.3g, max err %.3g of the bounds; element %zu: got %.6g want %.6g",
                    norm_ratio, max_ratio, worst, got[worst], want[worst]);
      report_failure(what, config, finite ? detail : "non-finite output");
    }
  }

  template <typename T>
  void compare(const char* what, const std::string& config, const std::vector<T>& got, const std::vector<double>& want,
               double tol) {
    compare(what, config, to_double(got), want, tol);
  }

  // A property that must hold whatever the mode (e.g. which kernel a launcher took).
  void expect(bool ok, const char* what, const std::string& config, const char* detail) {
    if (!ok) report_failure(what, config, detail);
  }

  // A launcher that returned an error where none was expected.
  void launch_failed(const char* what, const std::string& config) { report_failure(what, config, "launch failed"); }

  // Prints the summary; the process exit status.
  int finish() const {
    if (negative_) {
      const bool ok = undetected_ == 0 && failures_ == 0 && perturbed_checks_ > 0;
      std::printf("%s negative control: %ld perturbed checks, %ld undetected, %ld other failures, %ld launches: %s\n",
                  suite_, perturbed_checks_, undetected_, failures_, emu::launch_count(),
                  ok ? "every perturbation caught" : "FAILED");
      return ok ? 0 : 1;
    }
    std::printf("%s%s: %ld checks (%ld empty), %ld failures, %ld launches; worst error %.3g (norm) and %.3g (max) "
                "of the bounds\n",
                suite_, full_ ? " (full)" : "", checks_, empty_checks_, failures_, emu::launch_count(),
                worst_norm_ratio_, worst_max_ratio_);
    return failures_ == 0 && checks_ > empty_checks_ ? 0 : 1;
  }

 private:
  void perturb(std::vector<double>& want, double rms, double tol) {
    if (perturbed_checks_ % 2 == 0) {
      size_t peak = 0;
      for (size_t i = 1; i < want.size(); ++i)
        if (std::fabs(want[i]) > std::fabs(want[peak])) peak = i;
      want[peak] += (want[peak] < 0 ? -8 : 8) * tol * std::max(rms, std::fabs(want[peak]));
    } else {
      for (size_t i = 0; i < want.size(); ++i) want[i] += (i % 2 ? -2 : 2) * tol * rms;
    }
  }

  void report_failure(const char* what, const std::string& config, const char* detail) {
    ++failures_;
    std::printf("FAIL %s %s: %s\n", what, config.c_str(), detail);
  }

  const char* suite_;
  bool negative_ = false, full_ = false;
  long checks_ = 0, empty_checks_ = 0, perturbed_checks_ = 0, undetected_ = 0, failures_ = 0;
  double worst_norm_ratio_ = 0, worst_max_ratio_ = 0;
};

// Guard tails: an output buffer gets kGuard elements of kSentinel (exact in every dtype) past
// its end (guarded), the kernel writes the first n (body), and check_guards compares the tails
// with the sentinel, so an out-of-bounds write past the end fails without a sanitizer.
constexpr int64_t kGuard = 64;
constexpr double kSentinel = 1024.0;

template <typename T>
std::vector<T> guarded(const std::vector<T>& v) {
  std::vector<T> out = v;
  out.resize(v.size() + kGuard, from_double<T>(kSentinel));
  return out;
}

template <typename T>
std::vector<double> body(const std::vector<T>& v, int64_t n) {
  return to_double(std::vector<T>(v.begin(), v.begin() + n));
}

template <typename T>
std::vector<double> tail(const std::vector<T>& v, int64_t n) {
  return to_double(std::vector<T>(v.begin() + n, v.end()));
}

inline void check_guards(Checker& check, const std::string& config, const std::vector<std::vector<double>>& tails) {
  std::vector<double> got;
  for (const auto& t : tails) got.insert(got.end(), t.begin(), t.end());
  check.compare("guard (out-of-bounds writes)", config, got, std::vector<double>(got.size(), kSentinel), 1e-12);
}

}  // namespace emu_check
