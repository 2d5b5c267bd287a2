"""The kernel sets and how each is compiled: plain data, read by setup.py at install and by native.py at run.

No imports beyond the standard library: setup.py loads this file by path in pip's build environment, where
neither torch nor edgeshard is installed.
"""

_COMMON = ["-O3", "-fPIC", "-fopenmp"]  # + "-shared" when native.py links by hand
# dot.c: -ffp-contract=off so that plain C `a * b + c` is never fused in one place and not another (the
# same row must give the same bits in every code path); -fno-math-errno and -fno-trapping-math let loops
# with sqrtf, rounding and selects vectorize (neither changes a value: no -ffast-math reassociation).
_DOT_COMMON = [*_COMMON, "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
_X86_512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
# kernel set -> (compiler flags, CPU features it needs: /proc/cpuinfo flags on x86, Features on ARM)
VARIANTS: dict[str, tuple[list[str], set[str]]] = {
    "amx": (
        [*_X86_512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
        {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"},
    ),
    "avx512-vnni": (
        [*_X86_512, "-mavx512vnni"],
        {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c"},
    ),  # fmt: skip
    "avx512": (_X86_512, {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "neon-dot": (["-march=armv8.2-a+dotprod"], {"asimd", "asimddp"}),
    "neon": (["-march=armv8-a"], {"asimd"}),
    "generic": (["-DES_FORCE_GENERIC"], set()),  # plain C: a reference, never picked automatically
}
_X86_ORDER, _ARM_ORDER = ("amx", "avx512-vnni", "avx512", "avx2"), ("neon-dot", "neon")


def library_stem(variant: str) -> str:
    """The installed library's name without its extension suffix: `_kernels_avx512_vnni` for avx512-vnni."""
    return "_kernels_" + variant.replace("-", "_")


def sources(variant: str) -> str:
    """The C file a kernel set is compiled from (relative to node/lowbit/): AMX's decode.c (which includes
    lowbit.c), the dot-product kernels' dot.c for every other set."""
    return "csrc/decode.c" if variant == "amx" else "csrc/dot.c"


def for_machine(machine: str) -> list[str]:
    """The kernel sets worth building on a machine (`platform.machine()`): its ISA's, plus the plain-C one."""
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return [*_X86_ORDER, "generic"]
    if m in ("aarch64", "arm64"):
        return [*_ARM_ORDER, "generic"]
    return ["generic"]
