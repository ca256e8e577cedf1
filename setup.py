"""Build and install structtoken-d2 with its compiled ops ``structtoken_d2._C``.

- C++ sources (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are always compiled.
- CUDA sources (``csrc/cuda/*.cu``) too when nvcc is found (``CUDA_HOME``) or ``FORCE_CUDA=1``;
  ``FORCE_CUDA=0`` builds CPU-only. ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0`` when no GPU
  is visible.
- With no C++ compiler (or ``STRUCTTOKEN_D2_NO_EXTENSION=1``) the package installs pure-Python and
  uses the PyTorch reference ops.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted(cuda_home) -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None:
        return force == "1"
    return cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def _extensions():
    if os.environ.get("STRUCTTOKEN_D2_NO_EXTENSION") == "1" or shutil.which(os.environ.get("CXX", "c++")) is None:
        print("structtoken-d2: building without the compiled extension (pure-PyTorch ops)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        print("structtoken-d2: no C++ sources in csrc/, building without the compiled extension")
        return [], {}
    cxx_flags = ["-O3", "-std=c++20", "-Wno-unknown-pragmas"]  # torch >= 2.10 headers need C++20; theirs use `#pragma unroll`
    if _cuda_wanted(CUDA_HOME):
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        print(f"structtoken-d2: building CPU + CUDA ops (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})")
        ext = CUDAExtension(
            "structtoken_d2._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
        )
    else:
        print("structtoken-d2: building CPU ops only (no nvcc found or FORCE_CUDA=0)")
        ext = CppExtension("structtoken_d2._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    name="structtoken-d2",
    version="0.1.0",
    description="StructToken semantic segmentation (structure-aware extraction) for Detectron2, with fused kernels",
    packages=find_packages(exclude=("tests", "tools", "configs")),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
