// The pybind11 module tur_ext._C. Importing it loads this library, whose static initialisers register the
// tur::* ops; its only Python function reports how the library was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>

#ifndef TUR_TORCH_VERSION
#define TUR_TORCH_VERSION "unknown"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

std::string simd_level() {
#if defined(__AVX512F__)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#elif defined(__AVX__)
  return "AVX";
#elif defined(__SSE4_2__)
  return "SSE4.2";
#elif defined(__SSE2__)
  return "SSE2";
#elif defined(__ARM_NEON)
  return "NEON";
#else
  return "scalar";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef TUR_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(TUR_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
#endif
  info["threads"] = at::get_num_threads();
  info["simd"] = simd_level();
  info["torch_version"] = std::string(TUR_TORCH_VERSION);  // the torch it was compiled against
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tur_ext compiled kernels; the ops themselves are reached as torch.ops.tur.*";
  m.def("build_info", &build_info, "How this extension was built: CUDA and archs, OpenMP, threads, SIMD, torch");
}
