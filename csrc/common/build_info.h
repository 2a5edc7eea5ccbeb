// What the loaded native library was built with (reported by lrkernels.build_info()).
#pragma once

#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#if LRKERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace lrkernels {

inline pybind11::dict build_info() {
  pybind11::dict d;
  d["cuda"] = static_cast<bool>(LRKERNELS_WITH_CUDA);
#if LRKERNELS_WITH_CUDA
  d["cuda_runtime_version"] = CUDART_VERSION;
#ifdef LRKERNELS_CUDA_ARCH_LIST
#define LRK_STRINGIFY_(...) #__VA_ARGS__
#define LRK_STRINGIFY(...) LRK_STRINGIFY_(__VA_ARGS__)
  {
    // setup.py joins the TORCH_CUDA_ARCH_LIST entries with '_' (nvcc splits -D values at commas)
    std::string archs(LRK_STRINGIFY(LRKERNELS_CUDA_ARCH_LIST));
    for (char& c : archs)
      if (c == '_') c = ';';
    d["cuda_arch_list"] = archs;
  }
#else
  d["cuda_arch_list"] = std::string("");
#endif
#else
  d["cuda_runtime_version"] = pybind11::none();
  d["cuda_arch_list"] = std::string("");
#endif
  d["torch_version"] = std::string(TORCH_VERSION);
#ifdef __VERSION__
  d["compiler"] = std::string(__VERSION__);
#endif
  return d;
}

}  // namespace lrkernels
