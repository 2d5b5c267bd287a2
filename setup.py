"""Build the node's low-bit kernels at install time (pyproject.toml holds everything else).

Every kernel set of the build machine's architecture (node/lowbit/variants.py) is compiled from
node/lowbit/csrc/ with its explicit ISA flags into a library inside the package, as Python packages build C
extensions; node/lowbit/native.py picks one at run time by CPU features and loads it with ctypes. A set the
compiler cannot build (an old gcc without AMX flags), or a machine without a C compiler, is skipped with a
warning: edgeshard still installs and runs on torch's kernels, and `edgeshard doctor`/the node say so.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("variants", HERE / "node" / "lowbit" / "variants.py")
variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variants)


class OptionalKernels(build_ext):
    """build_ext that skips a kernel set it cannot build instead of failing the install."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError, a missing compiler
            print(f"edgeshard: not building {ext.name} ({type(e).__name__}: {e}); torch's kernels stand in")

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler at all (distutils raises before any extension)
            print(f"edgeshard: no low-bit kernels built ({type(e).__name__}: {e}); torch's kernels stand in")

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # plain C libraries loaded with ctypes: no PyInit_ function to export


def kernel(variant: str) -> Extension:
    common = variants._COMMON if variant == "amx" else variants._DOT_COMMON
    return Extension(
        f"edgeshard.node.lowbit.{variants.library_stem(variant)}",
        sources=[f"node/lowbit/{variants.sources(variant)}"],
        depends=[str(p.relative_to(HERE)) for p in (HERE / "node" / "lowbit" / "csrc").glob("*.c")],
        extra_compile_args=[*common, *variants.VARIANTS[variant][0]],
        extra_link_args=["-fopenmp"],
        language="c",
    )


setup(
    ext_modules=[kernel(v) for v in variants.for_machine(platform.machine())],
    cmdclass={"build_ext": OptionalKernels},
)
