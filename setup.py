"""Build the single extension module ``xraydeconv._C``.

CUDA sources are compiled only when torch was built with CUDA and nvcc is found
(or ``FORCE_CUDA=1``); otherwise a CPU-only module is built.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns: str) -> list[str]:
    """Source files matching the patterns (relative to csrc/), as paths relative to this file, sorted."""
    found = []
    for pattern in patterns:
        found += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern)))
    return found


def _extension():
    sources = _sources("*.cpp", "cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    use_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    if os.environ.get("XRAYDECONV_CPU_ONLY") == "1":
        use_cuda = False
    if use_cuda:
        nvcc = ["-O3", "-std=c++17", "--use_fast_math"]
        if os.environ.get("TORCH_CUDA_ARCH_LIST") is None:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension(
            "xraydeconv._C",
            sources + _sources("cuda/*.cpp", "cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DXRAYDECONV_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("xraydeconv._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
