"""The node's own low-bit kernels, built for the CPU they run on, called via ctypes.

Two families, one chosen per process at first use (`kernel_set()`):
- "amx": node/lowbit/csrc/lowbit.c + decode.c on Intel AMX (Xeon Sapphire Rapids and later). torch's int4/int8
  CPU kernels dequantize once per input *row*, so a batched decode step of 8 sequences costs 4-5x a single
  one; lowbit.c expands each weight block once and multiplies it with up to 16 rows in one AMX instruction.
- the integer dot-product kernels of node/lowbit/csrc/dot.c for every other CPU the users have: "avx512-vnni",
  "avx512", "avx2" (x86 laptops: AVX2+FMA+F16C), "neon-dot" (Raspberry Pi 5: ARMv8.2 sdot), "neon"
  (Raspberry Pi 4). Input rows are quantized to int8 per 32 and multiplied with the weight codes by
  integer dot products, as llama.cpp does; see dot.c for why and for the layout (node/lowbit/kernels.py's layers).

Each variant is compiled from the same source with explicit ISA flags (never -march=native: one install
serves every CPU of its architecture, and none is handed an instruction it lacks) when edgeshard is
installed: setup.py builds every set of the machine's architecture (lowbit/variants.py) as a library next to
this file, the way Python packages build their C extensions. At run time the set is picked from the CPU's
features and loaded from the package; nothing is compiled into, or loaded from, a user-writable cache
(EDGESHARD_BUILD_KERNELS=1 does that, for developers editing the C). The libraries link OpenMP by soname
only, so they share torch's runtime and thread pool.

`EDGESHARD_KERNELS=amx|avx512|avx512-vnni|avx2|neon|neon-dot|generic|torch` forces a set (to measure the
users' paths on a bigger CPU; a set this CPU cannot run falls back to torch's kernels and `status()` says
why); `EDGESHARD_NATIVE=0` is the same as `torch`. Installed without a C compiler, or on a CPU with none of
these, the layers keep torch's kernels (the same formats, results to bf16 precision) and the node says so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from edgeshard.node.lowbit.variants import (
    _ARM_ORDER,
    _COMMON,
    _DOT_COMMON,
    _X86_ORDER,
    VARIANTS,
    library_stem,
)
from edgeshard.node.trust import cpu_identity, untrusted_reason

SOURCE = Path(__file__).with_name("csrc") / "decode.c"  # includes lowbit.c
DOT_SOURCE = SOURCE.with_name("dot.c")  # the integer dot-product kernels for CPUs without AMX
BLOCK_N = 16  # output rows per weight block (one AMX tile's columns); layers pad N up to a multiple
GROUP = 32  # k per block (one AMX tile's depth in bf16); the int4 scale group

_P, _I = ctypes.c_void_p, ctypes.c_int64
_DECODE_STAGE = (  # layers, count, S, D, H, Hkv, hd, F, eps, x, cos, sin, kv buffers, caps, positions, threads
    [_P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _P, _P, ctypes.c_int],
    ctypes.c_int,
)
_SIGNATURES = {
    "es_int4_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], ctypes.c_int),
    "es_int8_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], None),
    "es_supported": ([], ctypes.c_int),
    "es_decode_stage": _DECODE_STAGE,
}
_DOT_SIGNATURES = {
    "es_dot_int4_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], ctypes.c_int),
    "es_dot_int8_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], ctypes.c_int),
    "es_dot_isa": ([], ctypes.c_char_p),
    "es_decode_stage": _DECODE_STAGE,
}
_why_not = ""


def _cache_dir() -> Path:
    home = os.environ.get("EDGESHARD_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "edgeshard") / "kernels"


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _is_arm64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU's feature names as Linux lists them (x86 `flags`, ARM `Features`); empty when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(cc: str, variant: str) -> Path:
    """Compile one kernel set into the cache (an atomic rename: nodes starting together may race) and return
    the library's path. "amx" is decode.c (which includes lowbit.c); every other set is dot.c with its ISA's
    explicit flags (VARIANTS). The one place the kernels are compiled."""
    source = SOURCE if variant == "amx" else DOT_SOURCE
    flags = ["-shared", *(_COMMON if variant == "amx" else _DOT_COMMON), *VARIANTS[variant][0]]
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.c")))
    # the CPU's model and flags are part of the key too (a home shared by other CPUs: never another's build)
    key = hashlib.sha256(sources + " ".join([cc, *flags, platform.machine(), cpu_identity()]).encode())
    target = _cache_dir() / f"lowbit-{variant}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, "-o", tmp, str(source)], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def runnable(variant: str) -> str:
    """ "" when this machine can run kernel set `variant`, else why not."""
    if variant not in VARIANTS:
        return f"unknown kernel set {variant!r} (one of {', '.join(VARIANTS)}, torch)"
    if variant != "generic" and (variant in _X86_ORDER) != _is_x86():
        return f"{variant} kernels do not run on {platform.machine()}"
    if variant in _ARM_ORDER and not _is_arm64():
        return f"{variant} kernels need aarch64 (this is {platform.machine()})"
    missing = VARIANTS[variant][1] - cpu_features()
    return f"this CPU lacks {', '.join(sorted(missing))} for {variant}" if missing else ""


def installed(variant: str) -> Path | None:
    """The library of kernel set `variant` that setup.py compiled when edgeshard was installed, if any."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{library_stem(variant)}{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def variant_library(variant: str) -> ctypes.CDLL:
    """Load kernel set `variant` (once); raises RuntimeError when it cannot run here. A process can hold
    layers of several sets (tests force each); each layer calls its own set's library.

    The libraries are compiled when edgeshard is installed (setup.py; an extension module next to this file,
    written where the package lives), never at run time into a directory another user may write:
    EDGESHARD_BUILD_KERNELS=1 is the exception, for developers editing the C: it builds the current source into
    the cache and loads that instead (node/trust.py still refuses a library another user could have written).
    """
    if why := runnable(variant):
        raise RuntimeError(why)
    developing = os.environ.get("EDGESHARD_BUILD_KERNELS") == "1"  # the C as it is now, not as installed
    path = None if developing else installed(variant)
    if path is None and developing:
        cc = _compiler()
        if not cc:
            raise RuntimeError("EDGESHARD_BUILD_KERNELS=1 but no C compiler found (install gcc, or set CC)")
        try:
            path = build(cc, variant)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip()
            name = SOURCE.name if variant == "amx" else DOT_SOURCE.name
            raise RuntimeError(
                f"building {name} with {cc} failed: {detail.splitlines()[-1] if detail else e!r}"
            ) from e
    if path is None:
        raise RuntimeError(
            f"the {variant} kernels were not built when edgeshard was installed (no C compiler then?): "
            "install gcc and reinstall edgeshard (`pip install --force-reinstall --no-deps edgeshard`, or "
            "`pip install -e .` in a checkout)"
        )
    try:
        if why := untrusted_reason(path):  # node/trust.py: never load code another user could have written
            logging.getLogger("edgeshard.node").warning(
                "low-bit kernels: refusing to load %s: %s; using torch's kernels", path, why
            )
            raise RuntimeError(f"refusing to load {path}: {why}")
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL releases the GIL during calls
    except OSError as e:
        raise RuntimeError(f"loading {path.name} failed: {e}") from e
    for name, (args, res) in (_SIGNATURES if variant == "amx" else _DOT_SIGNATURES).items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if variant == "amx" and not lib.es_supported():
        raise RuntimeError("this CPU or kernel has no AMX-BF16 tiles")
    if variant != "amx" and lib.es_dot_isa().decode() != variant:  # the flags did not select the variant
        raise RuntimeError(f"{DOT_SOURCE.name} built for {variant} compiled as {lib.es_dot_isa().decode()}")
    return lib


@functools.cache
def _selected() -> tuple[str, ctypes.CDLL | None]:
    """(kernel set, its library) for this process: EDGESHARD_KERNELS if set, else the first set of
    _X86_ORDER / _ARM_ORDER this machine runs; ("torch", None) when none (`_why_not` says why)."""
    global _why_not
    forced = os.environ.get("EDGESHARD_KERNELS", "").strip().lower()
    if os.environ.get("EDGESHARD_NATIVE", "1") == "0" or forced == "torch":
        _why_not = "disabled by " + ("EDGESHARD_NATIVE=0" if forced != "torch" else "EDGESHARD_KERNELS=torch")
        return "torch", None
    if forced == "neon" and "asimddp" in cpu_features():
        forced = "neon-dot"  # "neon" means the NEON kernels: with sdot where the CPU has it
    if forced == "avx512" and "avx512_vnni" in cpu_features():
        forced = "avx512-vnni"
    candidates = [forced] if forced else list(_X86_ORDER if _is_x86() else _ARM_ORDER if _is_arm64() else ())
    reasons = []
    for variant in candidates:
        try:
            return variant, variant_library(variant)
        except RuntimeError as e:
            reasons.append(str(e))
    _why_not = "; ".join(reasons) or f"no native kernels for {platform.machine()}"
    return "torch", None


def reset() -> None:
    """Forget the chosen kernel set (tests change EDGESHARD_KERNELS, then build new layers)."""
    _selected.cache_clear()


def kernel_set() -> str:
    """The low-bit kernels new layers use in this process: "amx", "avx512-vnni", "avx512", "avx2",
    "neon-dot", "neon", "generic" or "torch"."""
    return _selected()[0]


def library() -> ctypes.CDLL | None:
    """The loaded kernels of `kernel_set()`, or None for torch's (`status()` says why)."""
    return _selected()[1]


def available() -> bool:
    """True when native kernels (AMX or dot-product) are built, loaded and runnable on this CPU."""
    return library() is not None


def amx() -> bool:
    """True when the AMX kernels are in use."""
    return kernel_set() == "amx"


# What the torch fallback does not promise (docs/kernels.md, tests/test_kernels.py checks it on this machine):
# torch's int4/int8 kernels and the dense bf16 path each give a row the same bits in any batch, but a layer
# switches from the first to the second at `dense_min_rows` rows, so a row's result depends on how many rows
# share its batch (a prefill chunk next to it, or many concurrent sequences).
TORCH_NOT_BATCH_INVARIANT = "not batch-invariant: a row's result can change with the rows batched with it"


def status() -> str:
    """One line for diagnostics: which low-bit kernels this process uses, and why."""
    if (name := kernel_set()) == "amx":
        return "AMX kernels (node/lowbit/csrc/lowbit.c)"
    if name != "torch":
        return f"{name} integer dot-product kernels (node/lowbit/csrc/dot.c)"
    return f"torch kernels (native kernels unavailable: {_why_not}; {TORCH_NOT_BATCH_INVARIANT})"


def padded(n: int) -> int:
    """Output rows rounded up to whole blocks."""
    return -(-n // BLOCK_N) * BLOCK_N


def _tile_order(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes, N % 16 == 0 -> (N/16, K/32, 512) in AMX B-tile order: [k pair i][n][k parity]."""
    n, k = q.shape
    blocks = q.view(n // BLOCK_N, BLOCK_N, k // GROUP, GROUP // 2, 2)  # (nb, n, g, i, e)
    return blocks.permute(0, 2, 3, 1, 4).reshape(n // BLOCK_N, k // GROUP, 512)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q uint8 (N, K) in 0..15 and per-32 scale/min (N, K/32), N % 16 == 0, meaning W = q * scale + min
    -> (codes uint8 (N/16, K/32, 256), params float16 (N/16, K/32, 2, 16): scale and min per block).

    float16 holds GGUF's Q4_0/Q4_1 fields exactly (they are fp16) and rounds Q4_K's products d * sc and
    re-quantized parameters to 11 significant bits (torch's kernel: bf16, 8 bits)."""
    n, k = q.shape
    # tile row 4j + part, word 8L + i (L: 128-bit lane) comes from byte 16L + 8*(part % 2) + i of load j,
    # low nibble for parts 0-1, high for 2-3: the order unpacklo/hi_epi8 produce (lowbit.c, expand_int4)
    t = _tile_order(q.to(torch.uint8)).view(n // BLOCK_N, k // GROUP, 4, 4, 4, 8)  # (nb, g, j, part, L, i)
    codes = (t[:, :, :, :2] | (t[:, :, :, 2:] << 4)).permute(0, 1, 2, 4, 3, 5)  # (nb, g, j, L, part%2, i)
    codes = codes.reshape(n // BLOCK_N, k // GROUP, 256).contiguous()
    params = torch.stack([scale, minv], dim=-1).to(torch.float16)  # (N, K/32, 2)
    params = params.view(n // BLOCK_N, BLOCK_N, k // GROUP, 2).permute(0, 2, 3, 1).contiguous()
    return codes, params


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K), N % 16 == 0 -> (N/16, K/32, 512) in B-tile order."""
    return _tile_order(q.to(torch.int8)).contiguous()


def _check(x: torch.Tensor, k: int) -> None:
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k or not x.is_contiguous():
        raise ValueError(f"expected contiguous bf16 (M, {k}) activations, got {x.dtype} {tuple(x.shape)}")


def int4_mm(x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) bf16 @ W.T -> (M, n) bf16 for an int4 weight packed by `pack_int4` (codes, float16 params)."""
    k = codes.shape[1] * GROUP
    _check(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    rc = variant_library("amx").es_int4_mm(
        x.data_ptr(),
        x.shape[0],
        k,
        codes.data_ptr(),
        params.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError(f"the int4 kernel could not allocate its scratch for {x.shape[0]} rows")
    return y


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ W.T -> (M, N) bf16 for int8 codes packed by `pack_int8` and bf16 row scales (N,)."""
    k, n = codes.shape[1] * GROUP, scales.shape[0]
    _check(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    variant_library("amx").es_int8_mm(
        x.data_ptr(),
        x.shape[0],
        k,
        codes.data_ptr(),
        scales.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    return y


# --- the dot-product kernels' layout and calls (node/lowbit/csrc/dot.c) -------------------------------------------


def _dot_order(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes, N % 16 == 0 -> (N/16, K/32, 8, 64): per block of 16 rows x 32 inputs, [k quad][n][k % 4]."""
    n, k = q.shape
    blocks = q.view(n // BLOCK_N, BLOCK_N, k // GROUP, GROUP // 4, 4)  # (nb, n, g, kq, e)
    return blocks.permute(0, 2, 3, 1, 4).reshape(n // BLOCK_N, k // GROUP, 8, 64)


def pack_dot_int4(
    q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes q uint8 (N, K) in 0..15 and per-32 scale/min (N, K/32), N % 16 == 0, meaning W = q * scale + min
    -> (codes uint8 (N/16, K/32, 256), params float16 (N/16, K/32, 2, 16)) in dot.c's layout: k quads j and
    j + 4 share a byte (low, high nibble). float16 parameters as in `pack_int4` (Q4_0/Q4_1 exact)."""
    n, k = q.shape
    t = _dot_order(q.to(torch.uint8))
    codes = (t[:, :, :4] | (t[:, :, 4:] << 4)).reshape(n // BLOCK_N, k // GROUP, 256).contiguous()
    params = torch.stack([scale, minv], dim=-1).to(torch.float16)  # (N, K/32, 2)
    params = params.view(n // BLOCK_N, BLOCK_N, k // GROUP, 2).permute(0, 2, 3, 1).contiguous()
    return codes, params


def unpack_dot_int4(codes: torch.Tensor) -> torch.Tensor:
    """`pack_dot_int4`'s codes back to q uint8 (N, K)."""
    nb, groups = codes.shape[:2]
    c = codes.view(nb, groups, 4, 64)
    t = torch.cat([c & 15, c >> 4], dim=2).view(nb, groups, 8, BLOCK_N, 4)  # (nb, g, kq, n, e)
    return t.permute(0, 3, 1, 2, 4).reshape(nb * BLOCK_N, groups * GROUP)


def pack_dot_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K), N % 16 == 0 -> (N/16, K/32, 512) in dot.c's [k quad][n][k % 4] order."""
    n, k = q.shape
    return _dot_order(q.to(torch.int8)).reshape(n // BLOCK_N, k // GROUP, 512).contiguous()


def unpack_dot_int8(codes: torch.Tensor) -> torch.Tensor:
    """`pack_dot_int8`'s codes back to int8 (N, K)."""
    nb, groups = codes.shape[:2]
    t = codes.view(nb, groups, 8, BLOCK_N, 4)
    return t.permute(0, 3, 1, 2, 4).reshape(nb * BLOCK_N, groups * GROUP)


def dot_int4_mm(
    variant: str, x: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, n: int
) -> torch.Tensor:
    """x (M, K) bf16 @ W.T -> (M, n) bf16 on kernel set `variant`, W packed by `pack_dot_int4`."""
    return _dot_mm(variant_library(variant).es_dot_int4_mm, "int4", x, codes, params, n)


def dot_int8_mm(variant: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) bf16 @ W.T -> (M, N) bf16 on kernel set `variant`, W packed by `pack_dot_int8` with bf16
    row scales (N,)."""
    return _dot_mm(variant_library(variant).es_dot_int8_mm, "int8", x, codes, scales, scales.shape[0])


def _dot_mm(
    fn, what: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, n: int
) -> torch.Tensor:
    """One call of dot.c's es_dot_int{4,8}_mm: (M, K) bf16 rows against packed codes and their scales."""
    k = codes.shape[1] * GROUP
    _check(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    rc = fn(
        x.data_ptr(),
        x.shape[0],
        k,
        codes.data_ptr(),
        scales.data_ptr(),
        n,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if rc:
        raise MemoryError(f"the {what} kernel could not allocate its scratch for {x.shape[0]} rows")
    return y
