// The CPU loops of tur_loss_cpu_chunk.inc compiled for several SIMD levels in one file, and the run-time choice
// between them. The wheel-portable build targets SSE2 only, which leaves AVX2/AVX-512 machines (nearly all of
// them) at a quarter of their vector width; ATen dispatches its own kernels the same way.
//
// Every header is included before the first `#pragma GCC target`, so only this file's own loops are compiled
// for the wider instruction sets and no inline function shared with other files gets an AVX copy (which the
// linker could then pick for everyone). GCC on x86-64 only; other compilers and CPUs get the default level.
#include "cpu/tur_loss_cpu_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TUR_CPU_DISPATCH 1
#endif

#define TUR_CPU_NS level_default
#include "cpu/tur_loss_cpu_chunk.inc"
#undef TUR_CPU_NS

#ifdef TUR_CPU_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TUR_CPU_NS level_avx2
#include "cpu/tur_loss_cpu_chunk.inc"
#undef TUR_CPU_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define TUR_CPU_NS level_avx512
#include "cpu/tur_loss_cpu_chunk.inc"
#undef TUR_CPU_NS
#pragma GCC pop_options
#endif

namespace tur::cpu {
namespace {

constexpr Capability kAll[] = {Capability::Default, Capability::AVX2, Capability::AVX512};

bool cpu_supports(Capability c) {
  switch (c) {
    case Capability::Default:
      return true;
#ifdef TUR_CPU_DISPATCH
    // libgcc's checks include the OS's consent (XGETBV) to use the wider registers.
    case Capability::AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Capability::AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

// The level called `name`; `what` names the setting in the error for an unknown name.
Capability parse(const std::string& name, const char* what) {
  std::string known;
  for (Capability c : kAll) {
    if (name == capability_name(c)) return c;
    known += known.empty() ? capability_name(c) : std::string(", ") + capability_name(c);
  }
  TORCH_CHECK_VALUE(false, what, ": expected one of ", known, ", got '", name, "'");
}

Capability initial_capability() {
  const std::vector<Capability> ok = supported_capabilities();
  const char* env = std::getenv("TUR_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return ok.back();
  const Capability asked = parse(env, "TUR_CPU_CAPABILITY");
  // Like ATEN_CPU_CAPABILITY: a level this CPU lacks falls back to the best one it has.
  return std::min(asked, ok.back());
}

// -1 until the first call decides (the environment is read then, not at library load).
std::atomic<int> active{-1};

}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX2:
      return "avx2";
    case Capability::AVX512:
      return "avx512";
    default:
      return "default";
  }
}

std::vector<Capability> supported_capabilities() {
  std::vector<Capability> out;
  for (Capability c : kAll) {
    if (cpu_supports(c)) out.push_back(c);
  }
  return out;
}

Capability active_capability() {
  int level = active.load(std::memory_order_relaxed);
  if (level < 0) {
    level = static_cast<int>(initial_capability());
    int expected = -1;
    if (!active.compare_exchange_strong(expected, level)) level = expected;
  }
  return static_cast<Capability>(level);
}

std::string set_active_capability(const std::string& name) {
  const Capability c = parse(name, "capability");
  TORCH_CHECK_VALUE(cpu_supports(c), "capability: '", name, "' is not compiled in or not supported by this CPU");
  const std::string previous = capability_name(active_capability());
  active.store(static_cast<int>(c));
  return previous;
}

template <typename scalar_t, typename acc_t>
ChunkKernels<scalar_t, acc_t> chunk_kernels(Capability c) {
#ifdef TUR_CPU_DISPATCH
  if (c == Capability::AVX512) return level_avx512::kernels<scalar_t, acc_t>();
  if (c == Capability::AVX2) return level_avx2::kernels<scalar_t, acc_t>();
#endif
  return level_default::kernels<scalar_t, acc_t>();
}

template ChunkKernels<float, float> chunk_kernels<float, float>(Capability);
template ChunkKernels<double, double> chunk_kernels<double, double>(Capability);
template ChunkKernels<c10::Half, float> chunk_kernels<c10::Half, float>(Capability);
template ChunkKernels<c10::BFloat16, float> chunk_kernels<c10::BFloat16, float>(Capability);

}  // namespace tur::cpu
