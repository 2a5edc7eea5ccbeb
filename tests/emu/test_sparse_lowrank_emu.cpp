// The sparse-part kernels of sparse_lowrank.cuh (spmm_kernel over the CSR and over the CSC,
// sddmm_kernel with one chunk and with several + sddmm_reduce_kernel, through their launchers)
// run under the host emulator, each checked against a float64 reference of the formulas of
// sparse_lowrank_params.h as the binding (csrc/sparse_lowrank/sparse_lowrank_cuda.cu) uses them:
//   forward SpMM   y[t, o] = base[t, o] + Σ_{p in row o} v[perm[p]] · x[t, csr_col[p]]
//   backward SpMM  dx[t, i] = base[t, i] + Σ_{p in column i} v[perm[p]] · dy[t, csc_row[p]]
//   SDDMM          dv[k] = Σ_t dy[t, o] · x[t, c] for the entry k = (o, c)
// in fp32, fp16 and bf16 (x, dy and the SpMM output; values, base and dv float32), on random
// supports with empty rows and columns, nnz 0, 0 tokens, token counts not multiples of the
// block, and a corrupted support (which must give NaN, not an out-of-bounds read). The packed
// support is built here by a plain sort, independently of the CPU op's counting sorts.
#include "emu_check.h"

#include <algorithm>
#include <numeric>

#include "lrkernels/sparse_lowrank.cuh"

using namespace lrkernels;
using namespace emu_check;

namespace {

struct Case {
  int64_t tokens, in, out;
  double density;
  bool empty_lines;  // leave every third row and every fourth column empty
};

struct Support {
  std::vector<int64_t> flat;  // in sparse_values' order
  std::vector<int32_t> row_ptr, csr_col, csr_perm, col_ptr, csc_row, csc_perm;
};

Support make_support(Random& rng, const Case& c) {
  Support s;
  std::vector<int64_t> all;
  for (int64_t o = 0; o < c.out; ++o)
    for (int64_t i = 0; i < c.in; ++i)
      if (!c.empty_lines || (o % 3 != 1 && i % 4 != 2)) all.push_back(o * c.in + i);
  for (size_t k = all.size(); k > 1; --k) std::swap(all[k - 1], all[rng.integer(0, int64_t(k) - 1)]);
  const size_t nnz = std::min(all.size(), size_t(std::llround(c.density * c.in * c.out)));
  s.flat.assign(all.begin(), all.begin() + nnz);
  std::vector<int32_t> order(nnz);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return s.flat[a] < s.flat[b]; });
  s.row_ptr.assign(c.out + 1, 0);
  for (int32_t k : order) {
    s.csr_col.push_back(int32_t(s.flat[k] % c.in));
    s.csr_perm.push_back(k);
    ++s.row_ptr[s.flat[k] / c.in + 1];
  }
  for (int64_t o = 0; o < c.out; ++o) s.row_ptr[o + 1] += s.row_ptr[o];
  auto col_major = [&](int32_t a, int32_t b) {
    const int64_t ca = s.flat[a] % c.in, cb = s.flat[b] % c.in;
    return ca != cb ? ca < cb : s.flat[a] < s.flat[b];
  };
  std::sort(order.begin(), order.end(), col_major);
  s.col_ptr.assign(c.in + 1, 0);
  for (int32_t k : order) {
    s.csc_row.push_back(int32_t(s.flat[k] / c.in));
    s.csc_perm.push_back(k);
    ++s.col_ptr[s.flat[k] % c.in + 1];
  }
  for (int64_t i = 0; i < c.in; ++i) s.col_ptr[i + 1] += s.col_ptr[i];
  return s;
}

template <typename T>
void run(Checker& check, Random& rng, const Case& c) {
  const Support s = make_support(rng, c);
  const int64_t T_ = c.tokens, in = c.in, out = c.out, nnz = int64_t(s.flat.size());
  char buf[200];
  std::snprintf(buf, sizeof buf, "[%s T=%ld in=%ld out=%ld nnz=%ld]", type_name<T>(), T_, in, out, nnz);
  const std::string config = buf;
  const double tol = tolerance<T>();
  const auto x = rng.tensor<T>(T_ * in, 1.0);
  const auto dy = rng.tensor<T>(T_ * out, 1.0);
  const double vscale = 1.0 / std::sqrt(std::max(1.0, c.density * std::max(in, out)));
  const auto v = rng.tensor<float>(nnz, vscale);

  // forward SpMM, with a base (the low-rank part) and without
  for (bool with_base : {true, false}) {
    const auto base = rng.tensor<float>(T_ * out, 1.0);
    std::vector<double> want(T_ * out, 0.0);
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t k = 0; k < nnz; ++k) {
        const int64_t o = s.flat[k] / in, i = s.flat[k] % in;
        want[t * out + o] += double(v[k]) * to_double(x[t * in + i]);
      }
    if (with_base)
      for (int64_t e = 0; e < T_ * out; ++e) want[e] += base[e];
    std::vector<T> y = guarded(std::vector<T>(T_ * out, from_double<T>(NAN)));
    SparseSpmmParams<T> p;
    p.x = x.data(); p.ptr = s.row_ptr.data(); p.idx = s.csr_col.data(); p.perm = s.csr_perm.data();
    p.vals = v.data(); p.base = with_base ? base.data() : nullptr; p.out = y.data();
    p.tokens = T_; p.rows = out; p.cols = in; p.nnz = nnz;
    if (sparse_lowrank::launch_spmm(p, nullptr) != cudaSuccess) check.launch_failed("spmm csr", config);
    check.compare(with_base ? "spmm csr + base" : "spmm csr", config, body(y, T_ * out), want, tol);
    check_guards(check, config, {tail(y, T_ * out)});
  }
  // backward SpMM over the CSC: dx = base + dy S
  {
    const auto base = rng.tensor<float>(T_ * in, 1.0);
    std::vector<double> want(T_ * in);
    for (int64_t e = 0; e < T_ * in; ++e) want[e] = base[e];
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t k = 0; k < nnz; ++k) {
        const int64_t o = s.flat[k] / in, i = s.flat[k] % in;
        want[t * in + i] += double(v[k]) * to_double(dy[t * out + o]);
      }
    std::vector<T> dx = guarded(std::vector<T>(T_ * in, from_double<T>(NAN)));
    SparseSpmmParams<T> p;
    p.x = dy.data(); p.ptr = s.col_ptr.data(); p.idx = s.csc_row.data(); p.perm = s.csc_perm.data();
    p.vals = v.data(); p.base = base.data(); p.out = dx.data();
    p.tokens = T_; p.rows = in; p.cols = out; p.nnz = nnz;
    if (sparse_lowrank::launch_spmm(p, nullptr) != cudaSuccess) check.launch_failed("spmm csc", config);
    check.compare("spmm csc + base", config, body(dx, T_ * in), want, tol);
    check_guards(check, config, {tail(dx, T_ * in)});
  }
  // SDDMM: planned as the binding plans it, and forced to several chunks
  std::vector<double> want(nnz, 0.0);
  for (int64_t k = 0; k < nnz; ++k) {
    const int64_t o = s.flat[k] / in, i = s.flat[k] % in;
    for (int64_t t = 0; t < T_; ++t) want[k] += to_double(dy[t * out + o]) * to_double(x[t * in + i]);
  }
  // dv's error scales with sqrt(T) terms of O(1): the reference's own scale (rms) covers it
  for (int forced : {0, 3}) {
    SparseSddmmParams<T> p;
    p.dy = dy.data(); p.x = x.data(); p.row_ptr = s.row_ptr.data(); p.csr_col = s.csr_col.data();
    p.csr_perm = s.csr_perm.data(); p.tokens = T_; p.out = out; p.in = in; p.nnz = nnz;
    sparse_lowrank::plan_sddmm(p);
    if (forced && T_ >= forced) {
      p.chunk_tokens = (T_ + forced - 1) / forced;
      p.chunks = (T_ + p.chunk_tokens - 1) / p.chunk_tokens;
    }
    std::vector<float> partial(p.chunks > 1 ? p.chunks * nnz : 0, NAN);
    p.partial = partial.empty() ? nullptr : partial.data();
    std::vector<float> dv = guarded(std::vector<float>(nnz, NAN));
    p.dv = dv.data();
    if (sparse_lowrank::launch_sddmm(p, nullptr) != cudaSuccess) check.launch_failed("sddmm", config);
    check.compare(p.chunks > 1 ? "sddmm (chunks)" : "sddmm", config + " chunks=" + std::to_string(p.chunks),
                  body(dv, nnz), want, tolerance<float>() * 4 * std::sqrt(double(std::max<int64_t>(T_, 1))));
    check_guards(check, config, {tail(dv, nnz)});
  }
}

// A corrupted support: an out-of-range column in the CSR and a row pointer past nnz must give
// NaN where read (and no out-of-bounds access, which the guard tails and ASan would show).
void run_corrupted(Checker& check, Random& rng) {
  const Case c{5, 9, 7, 0.4, false};
  Support s = make_support(rng, c);
  const int64_t nnz = int64_t(s.flat.size()), T_ = c.tokens;
  const auto x = rng.tensor<float>(T_ * c.in, 1.0);
  const auto v = rng.tensor<float>(nnz, 0.5);
  s.csr_col[0] = int32_t(c.in + 5);        // the entry of the first non-empty row
  s.row_ptr[c.out - 1] = int32_t(nnz + 9);  // the last row: beyond nnz
  std::vector<float> y = guarded(std::vector<float>(T_ * c.out, 0.0f));
  SparseSpmmParams<float> p;
  p.x = x.data(); p.ptr = s.row_ptr.data(); p.idx = s.csr_col.data(); p.perm = s.csr_perm.data();
  p.vals = v.data(); p.out = y.data(); p.tokens = T_; p.rows = c.out; p.cols = c.in; p.nnz = nnz;
  if (sparse_lowrank::launch_spmm(p, nullptr) != cudaSuccess) check.launch_failed("spmm corrupted", "");
  int64_t first = 0;
  while (s.row_ptr[first + 1] == 0) ++first;
  bool ok = true;
  for (int64_t t = 0; t < T_; ++t)
    ok = ok && std::isnan(y[t * c.out + first]) && std::isnan(y[t * c.out + c.out - 1]);
  check.expect(ok, "spmm corrupted support gives NaN", "[f32 corrupted]", "a row read a bad index without NaN");
  check_guards(check, "[f32 corrupted]", {tail(y, T_ * c.out)});
}

}  // namespace

int main(int argc, char** argv) {
  Checker check("sparse_lowrank", argc, argv);
  // (tokens, in, out, density, empty rows/columns): in ≠ out, nnz 0, dense support, 0 tokens,
  // token counts across several 256-thread blocks and not multiples of them, a single row,
  // SDDMM with enough tokens for the planner's own chunks (nnz 6 · 300 tokens).
  const std::vector<Case> quick = {
      {7, 16, 8, 0.2, true},   {5, 12, 18, 0.3, false}, {9, 10, 10, 1.0, false}, {6, 8, 12, 0.0, false},
      {0, 8, 12, 0.25, false}, {37, 24, 20, 0.1, true},  {3, 1, 5, 0.6, false},   {300, 3, 2, 1.0, false},
      {19, 40, 24, 0.05, true}, {130, 6, 9, 0.5, true},
  };
  const std::vector<Case> extra = {{513, 64, 48, 0.03, true}, {1000, 20, 16, 0.2, false}};
  Random rng(20261203);
  int k = 0;
  for (const Case& c : check.select(quick, extra, 10)) {
    switch (k++ % 3) {
      case 0: run<float>(check, rng, c); run<half>(check, rng, c); break;
      case 1: run<bf16>(check, rng, c); run<float>(check, rng, c); break;
      default: run<half>(check, rng, c); run<bf16>(check, rng, c); break;
    }
  }
  if (!check.negative_control()) run_corrupted(check, rng);
  return check.finish();
}
