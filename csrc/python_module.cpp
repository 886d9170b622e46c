// The pybind11 module tur_ext._C. Importing it loads this library, whose static initialisers register the
// tur::* ops; its only Python function reports how the library was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/tur_loss_cpu_kernels.h"

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

std::vector<std::string> cpu_capabilities() {
  std::vector<std::string> names;
  for (tur::cpu::Capability c : tur::cpu::supported_capabilities()) names.emplace_back(tur::cpu::capability_name(c));
  return names;
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
  info["simd"] = simd_level();  // the baseline the library was compiled for
  info["cpu_capability"] = std::string(tur::cpu::capability_name(tur::cpu::active_capability()));
  info["cpu_capabilities"] = cpu_capabilities();
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
  m.def("cpu_capabilities", &cpu_capabilities, "SIMD levels of the CPU kernel that this machine can run");
  m.def("set_cpu_capability", &tur::cpu::set_active_capability, pybind11::arg("name"),
        "Selects the SIMD level of the CPU kernel; returns the previous one");
}
