"""The CUDA kernels of ``csrc/cuda/``, compiled as C++ for the CPU and run by the emulator ``runtime.h``.

CI has no GPU, so this is how the tests execute the device code of every ``.cu`` file: its kernels, their
launch geometry and the host code around them (the ATen calls then run on the CPU). :func:`load` compiles
``csrc/cuda/*.cu`` with ``-DST_CUDA_EMULATION`` and the emulator force-included (``csrc/cuda/device.cuh`` maps
launches, streams and device guards onto it), and with ``-Dstructtoken=structtoken_emulated`` (so that no
C++ symbol is shared with the real extension ``structtoken_d2._C``), into one shared library, cached under
``build/cuda_emulation/`` by a hash of everything that goes in, and returns ``torch.ops.structtoken_emulated``: the ``structtoken`` ops,
taking CPU tensors in the CUDA kernels' dtypes (float32, float16, bfloat16), with the same autograd formulas.

Even blocks run their threads round-robin, odd ones warp by warp (``runtime.h``), so a missing barrier around
shared memory shows up as wrong results. What it cannot show: speed, ``--use_fast_math`` accuracy (the emulator
uses the accurate libm functions), races that neither thread order exposes, and anything of cuBLAS (its GEMMs
run as ATen's CPU GEMMs).
"""
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAMESPACE = "structtoken_emulated"
CXX = os.environ.get("CXX", "c++")


def compiler_available() -> bool:
    return shutil.which(CXX) is not None


def _sources():
    return sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [HERE / "library.cpp"]


def _compile_flags():
    torch_include = Path(torch.__file__).parent / "include"
    includes = [ROOT / "csrc", torch_include, torch_include / "torch" / "csrc" / "api" / "include"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (["-x", "c++", "-std=c++20", "-O1", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-DST_CUDA_EMULATION",
             f"-Dstructtoken={NAMESPACE}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-include", str(HERE / "runtime.h")]
            + [f"-I{p}" for p in includes] + [f"-I{sysconfig.get_paths()['include']}"])


def _link_flags():
    lib_dir = Path(torch.__file__).parent / "lib"
    return ["-shared", f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-lc10", "-ltorch_cpu", "-ltorch"]


def _cache_key() -> str:
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted((ROOT / "csrc").rglob("*")) + sorted(HERE.glob("*")):
        if path.is_file() and path.suffix in {".cu", ".cuh", ".h", ".cpp"}:
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    digest.update(" ".join(_compile_flags() + _link_flags() + [CXX]).encode())
    return digest.hexdigest()[:16]


def _run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"CUDA emulation build failed:\n{' '.join(map(str, cmd))}\n{result.stderr[-8000:]}")


def build() -> Path:
    """The emulated library's path, compiling it first unless the cached build is current (~1-2 min)."""
    out_dir = ROOT / "build" / "cuda_emulation" / _cache_key()
    library = out_dir / f"{NAMESPACE}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = [out_dir / f"{src.stem}.o" for src in _sources()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_run, [CXX, *_compile_flags(), "-c", str(src), "-o", str(obj)])
                for src, obj in zip(_sources(), objects)]
        for job in jobs:
            job.result()
    partial = out_dir / f"{NAMESPACE}.so.partial"
    _run([CXX, *map(str, objects), *_link_flags(), "-o", str(partial)])
    os.replace(partial, library)  # the cache only ever holds a complete library
    for stale in out_dir.parent.iterdir():  # builds of earlier sources
        if stale != out_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return library


def load():
    """``torch.ops.structtoken_emulated`` with fake kernels and autograd registered (built if needed)."""
    if not hasattr(load, "ops"):
        torch.ops.load_library(str(build()))
        from structtoken_d2.ops import registrations

        registrations.register(NAMESPACE)
        load.ops = getattr(torch.ops, NAMESPACE)
    return load.ops
