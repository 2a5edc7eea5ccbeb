// Batched one-dimensional real FFTs for C³A through cuFFT, with plans cached per (length,
// batch, direction, device, stream): created once on first use, reused by every later call.
// Plans do not own a work area (auto-allocation off): the caller passes one for each call,
// so the memory comes from the framework's stream-ordered allocator and no cudaMalloc happens
// after the first call (the ops stay CUDA-graph capturable once warmed up).
#pragma once

#include <cuda_runtime.h>
#include <cufft.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

namespace lrkernels {
namespace c3a {

enum class FftDir : int { kRealToComplex = 0, kComplexToReal = 1 };

struct FftPlan {
  cufftHandle handle = 0;
  size_t work_bytes = 0;
  std::mutex mu;  // set-work-area + exec must not interleave between host threads
  ~FftPlan() {
    if (handle) cufftDestroy(handle);
  }
};

inline const char* cufft_error_string(cufftResult r) {
  switch (r) {
    case CUFFT_SUCCESS: return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN: return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED: return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE: return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE: return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR: return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED: return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED: return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE: return "CUFFT_INVALID_SIZE";
    case CUFFT_INVALID_DEVICE: return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE: return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED: return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED: return "CUFFT_NOT_SUPPORTED";
    default: return "unknown cuFFT error";
  }
}

// Why get_fft_plan did not hand out a plan, beyond cuFFT's own errors.
enum class PlanMiss : int { kNone = 0, kDuringCapture = 1 };

inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

// The cached plan for `batch` transforms of length n (real side n, complex side n / 2 + 1,
// rows contiguous) on the current device, bound to `stream`. Beyond kMaxPlans entries the
// cache is cleared (shapes churning), never during a call that holds a plan. Creating or
// destroying a plan allocates or frees device memory, which a stream being captured into a
// CUDA graph does not allow: then nothing is created and *miss = kDuringCapture.
inline cufftResult get_fft_plan(int64_t n, int64_t batch, FftDir dir, cudaStream_t stream,
                                std::shared_ptr<FftPlan>* out, PlanMiss* miss) {
  constexpr size_t kMaxPlans = 256;
  using Key = std::tuple<int64_t, int64_t, int, int, uintptr_t>;
  static std::mutex cache_mu;
  // Deliberately never destroyed: static teardown at exit may run after the CUDA runtime has
  // unloaded, when cufftDestroy would fail.
  static auto& cache = *new std::map<Key, std::shared_ptr<FftPlan>>();
  *miss = PlanMiss::kNone;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return CUFFT_INVALID_DEVICE;
  const Key key{n, batch, static_cast<int>(dir), device, reinterpret_cast<uintptr_t>(stream)};
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = cache.find(key);
  if (it != cache.end()) {
    *out = it->second;
    return CUFFT_SUCCESS;
  }
  if (stream_is_capturing(stream)) {
    *miss = PlanMiss::kDuringCapture;
    return CUFFT_SETUP_FAILED;
  }
  if (cache.size() >= kMaxPlans) cache.clear();
  auto plan = std::make_shared<FftPlan>();
  cufftResult r = cufftCreate(&plan->handle);
  if (r != CUFFT_SUCCESS) {
    plan->handle = 0;
    return r;
  }
  r = cufftSetAutoAllocation(plan->handle, 0);
  if (r != CUFFT_SUCCESS) return r;
  long long len = static_cast<long long>(n);
  const long long freqs = static_cast<long long>(n / 2 + 1);
  const bool r2c = dir == FftDir::kRealToComplex;
  // null embeds: the basic layout, rows of n reals / n/2+1 complex values, back to back.
  r = cufftMakePlanMany64(plan->handle, 1, &len, nullptr, 1, r2c ? len : freqs, nullptr, 1, r2c ? freqs : len,
                          r2c ? CUFFT_R2C : CUFFT_C2R, static_cast<long long>(batch), &plan->work_bytes);
  if (r != CUFFT_SUCCESS) return r;
  r = cufftSetStream(plan->handle, stream);
  if (r != CUFFT_SUCCESS) return r;
  cache.emplace(key, plan);
  *out = std::move(plan);
  return CUFFT_SUCCESS;
}

// in (batch, n) real → out (batch, n/2+1) complex, unnormalised.
inline cufftResult exec_r2c(FftPlan& plan, const float* in, float* out, void* work) {
  std::lock_guard<std::mutex> lock(plan.mu);
  cufftResult r = cufftSetWorkArea(plan.handle, work);
  if (r != CUFFT_SUCCESS) return r;
  return cufftExecR2C(plan.handle, const_cast<cufftReal*>(in), reinterpret_cast<cufftComplex*>(out));
}

// in (batch, n/2+1) complex → out (batch, n) real, unnormalised (× n). cuFFT may overwrite
// `in`: callers pass scratch spectra only.
inline cufftResult exec_c2r(FftPlan& plan, float* in, float* out, void* work) {
  std::lock_guard<std::mutex> lock(plan.mu);
  cufftResult r = cufftSetWorkArea(plan.handle, work);
  if (r != CUFFT_SUCCESS) return r;
  return cufftExecC2R(plan.handle, reinterpret_cast<cufftComplex*>(in), out);
}

}  // namespace c3a
}  // namespace lrkernels
