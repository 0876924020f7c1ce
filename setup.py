"""Build the single extension module ``xraydeconv._C``.

CUDA sources are compiled only when torch was built with CUDA and nvcc is found
(or ``FORCE_CUDA=1``); otherwise a CPU-only module is built.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))]
    sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-std=c++17", "-fopenmp"] if os.name != "nt" else ["/O2"]
    use_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    if os.environ.get("XRAYDECONV_CPU_ONLY") == "1":
        use_cuda = False
    if use_cuda:
        sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp")))]
        sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))]
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math"]
        if archs is None:
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return CUDAExtension(
            "xraydeconv._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DXRAYDECONV_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("xraydeconv._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
