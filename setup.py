"""Builds tur_ext._C: the C++ op always, the CUDA kernels when a CUDA toolkit and a CUDA torch are both present.

TUR_CUDA=1 forces CUDA (and fails loudly when it cannot be built), TUR_CUDA=0 forbids it.
TUR_NATIVE=1 compiles the CPU kernel for this machine's SIMD level (-march=native).
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("TUR_CUDA", "")
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if forced == "1":
        if not available:
            sys.exit(
                "TUR_CUDA=1 but CUDA cannot be built: "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r} (a CUDA build of torch is needed)"
            )
        return True
    if forced == "0":
        return False
    if forced:
        sys.exit(f"TUR_CUDA must be 0 or 1, got {forced!r}")
    return available


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # No floating-point contraction: the CPU kernel's SIMD levels (csrc/cpu/tur_loss_cpu_kernels.cpp) must agree
    # to the bit, and an FMA in one of them only would round differently.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    if os.environ.get("TUR_NATIVE") == "1":
        cxx.append("-march=native")
    define_macros = [("TUR_TORCH_VERSION", f'"{torch.__version__}"')]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if _want_cuda():
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        define_macros.append(("TUR_WITH_CUDA", "1"))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros.append(("TUR_CUDA_ARCHS", f'"{archs or "default"}"'))
        nvcc = ["-O3", "-lineinfo", "-std=c++20"]
        return CUDAExtension(
            "tur_ext._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs,
        )
    return CppExtension("tur_ext._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
