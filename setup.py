"""Build of m6-engine and its one extension, ``m6_engine._C``.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build
and a CUDA toolkit is found. Knobs (environment variables, read here and nowhere else):

  M6_BUILD_CUDA=0|1|auto force the CPU-only or the CUDA build (default, unset or auto: CUDA when
                         torch is a CUDA build and a toolkit is found)
  CUDA_HOME              the toolkit; else CUDA_PATH, /usr/local/cuda, the parent of `nvcc` on PATH
  TORCH_CUDA_ARCH_LIST   CUDA architectures, default "8.0;9.0"
  M6_CPU_CAPABILITY      SIMD level of the CPU kernels: avx512, avx2, default, or auto (unset: the
                         best this machine has; the build records it, and m6_engine refuses to
                         load a build this CPU cannot run)
  M6_CPU_NATIVE=1        compile the CPU kernels with -march=native (a source build for this machine)
  MAX_JOBS               parallel compile jobs (ninja)
  DEBUG=1                -O0 -g, no NDEBUG

Why we resolve CUDA_HOME ourselves (build_support.py, unit-tested by tests/test_build.py):
torch.utils.cpp_extension guesses the toolkit from the place of `nvcc` on PATH (e.g.
/usr/local/bin/nvcc -> /usr/local), and then fails to link `-lcudart`. It reads CUDA_HOME once, at
import, so it is set here before that import.
"""

import functools
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_support.py sits next to this file; not every build front end adds it

import build_support  # noqa: E402  (after the path set-up above)


def _fail(message):
    sys.stderr.write(f"\nm6-engine build error: {message}\n\n")
    sys.exit(1)


def _cuda_build_home():
    """The toolkit for the CUDA build (exported as CUDA_HOME for torch), or None for CPU-only."""
    try:
        home = build_support.cuda_build_home(os.environ)
    except build_support.BuildError as error:
        _fail(str(error))
    if home is not None:
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it at import
    return home


@functools.lru_cache(maxsize=None)  # asked by the flags, the build message and the record
def _cpu_capability():
    """The SIMD level of the CPU kernels (build_support.cpu_capability: M6_CPU_CAPABILITY, else
    the best this machine has)."""
    try:
        return build_support.cpu_capability(os.environ)
    except build_support.BuildError as error:
        _fail(str(error))


def _cpu_flags(capability):
    """Compile flags for the C++ kernels at SIMD level ``capability``.

    at::vec::Vectorized<float> is only SIMD when CPU_CAPABILITY_<LEVEL> is defined together with the
    matching -m flags; without them it compiles to scalar loops that still give the same results.
    """
    # -Wno-unknown-pragmas: torch's vectorised headers carry `#pragma unroll`, which g++ does not
    # know; its warnings would bury ours.
    flags = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"]
    if os.environ.get("M6_CPU_NATIVE") == "1":
        flags.append("-march=native")
    if capability == "avx512":
        # GCC 12's AVX-512 intrinsics start from `__m512 __Y = __Y;` (an undefined vector), which
        # it then reports as "may be used uninitialized" wherever they inline: 134 false warnings
        # per build (a false positive of the intrinsics headers, not of our code) that would bury ours.
        flags.append("-Wno-maybe-uninitialized")
    return flags + build_support.cpu_compile_flags(capability)


def _extensions():
    with_cuda = _cuda_build_home() is not None
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not sources:
        _fail("no C++ sources under csrc/: is this a complete checkout?")
    debug = os.environ.get("DEBUG") == "1"
    cxx = _cpu_flags(_cpu_capability())
    if debug:
        cxx = [f for f in cxx if not f.startswith("-O")] + ["-O0", "-g", "-UNDEBUG"]
    extra = {"cxx": cxx}
    define_macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo",
                         "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                         "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        if debug:
            extra["nvcc"] = ["-O0", "-g", "-G", "-std=c++20"]
        define_macros.append(("M6_WITH_CUDA", "1"))
        return [cpp_extension.CUDAExtension(
            "m6_engine._C", sources + cuda_sources, extra_compile_args=extra,
            define_macros=define_macros, extra_link_args=["-fopenmp"])]
    return [cpp_extension.CppExtension(
        "m6_engine._C", sources, extra_compile_args=extra, define_macros=define_macros,
        extra_link_args=["-fopenmp"])]


def _build_ext_class():
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self):
            if shutil.which(os.environ.get("CXX", "c++")) is None:
                _fail("no C++ compiler found (install g++, or set CXX)")
            print(f"m6-engine: CPU kernels for {_cpu_capability()}")
            super().build_extensions()
            self._write_cpu_flags(os.path.dirname(self.get_ext_fullpath("m6_engine._C")))

        def run(self):
            super().run()
            if self.inplace:  # the extension was copied into the source tree: so is its record
                self._write_cpu_flags(self.get_finalized_command("build_py").get_package_dir("m6_engine"))

        @staticmethod
        def _write_cpu_flags(folder):
            # Next to the extension, where m6_engine.ops looks before loading it.
            with open(os.path.join(folder, build_support.CPU_FLAGS_FILE), "w") as f:
                f.write(build_support.cpu_flags_record(_cpu_capability()))

    return BuildExtension.with_options(use_ninja=True)


def _is_metadata_only():
    # `setup.py --version`, egg_info and the like need no torch and no compiler.
    return any(a in sys.argv for a in ("egg_info", "--version", "--name", "dist_info"))


setup(
    name="m6-engine",
    version="0.1.0",
    description="Megatron-style training engine for M6, the multimodal Chinese mega-transformer",
    packages=find_packages(include=["m6_engine", "m6_engine.*", "megatron_ext", "megatron_ext.*"]),
    package_data={"m6_engine": ["_data/*"]},
    python_requires=">=3.10",
    ext_modules=[] if _is_metadata_only() else _extensions(),
    cmdclass={} if _is_metadata_only() else {"build_ext": _build_ext_class()},
    extras_require={"test": ["transformers"], "megatron": ["megatron-core==0.16.1"]},
)
