"""Builds kvtransfer._core from csrc/ (C++17, pybind11).

libfabric and libibverbs are loaded at run time with dlopen, so only their headers are needed
here; pkg-config locates them and a missing one just leaves that transport out of the build.
"""

import glob
import os
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup


def pkg_cflags(name: str) -> list[str] | None:
    try:
        out = subprocess.run(["pkg-config", "--cflags", name], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.split()


# Compile in parallel in every build, pip's included (KVTRANSFER_BUILD_JOBS, default: all cores).
ParallelCompile("KVTRANSFER_BUILD_JOBS", default=0).install()

sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
defines = []
extra_compile = ["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
fabric = pkg_cflags("libfabric")
if not any("/fabric/" in s for s in sources):
    fabric = None  # this checkout has no libfabric transport sources
if fabric is None or os.environ.get("KVTRANSFER_NO_FABRIC"):
    sources = [s for s in sources if "/fabric/" not in s]
else:
    defines.append(("KVT_HAVE_FABRIC", "1"))
    extra_compile += fabric
if os.environ.get("KVTRANSFER_REQUIRE_FABRIC") and fabric is None:
    raise SystemExit("KVTRANSFER_REQUIRE_FABRIC is set but pkg-config finds no libfabric")

ext = Pybind11Extension(
    "kvtransfer._core",
    sources,
    # A changed header alone rebuilds the extension (build_ext compares these with the .so).
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
    include_dirs=["csrc"],
    define_macros=defines,
    extra_compile_args=extra_compile,
    extra_link_args=["-ldl", "-pthread"],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
