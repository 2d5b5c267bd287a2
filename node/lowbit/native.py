"""The node's own low-bit kernels (node/csrc/lowbit.c, Intel AMX), built for the CPU they run on, called via ctypes.

Why our own: torch's int4/int8 CPU kernels dequantize once per input *row*, so a batched decode step of 8
sequences costs 4-5x a single one (`python benchmarks/kernels.py`). lowbit.c expands each weight
block once and multiplies it with up to 16 rows in one AMX instruction. It needs AMX-BF16 (Intel Xeon
Sapphire Rapids or later) and a C compiler; it is built on first use (`cc -O3 -march=native`, about a
second) into `$EDGESHARD_HOME/kernels` (default `~/.cache/edgeshard/kernels`), keyed by source, flags and
machine. The library links OpenMP by soname only, so it shares torch's runtime and thread pool.

Anywhere else (ARM boards, older x86, no compiler) or with `EDGESHARD_NATIVE=0`, `available()` is False and
the layers keep torch's kernels: same results to bf16 precision. `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from edgeshard.node.trust import cpu_identity, untrusted_reason

SOURCE = Path(__file__).with_name("csrc") / "decode.c"  # includes lowbit.c
BLOCK_N = 16  # output rows per weight block (one AMX tile's columns); layers pad N up to a multiple
GROUP = 32  # k per block (one AMX tile's depth in bf16); the int4 scale group

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "es_int4_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], ctypes.c_int),
    "es_int8_mm": ([_P, _I, _I, _P, _P, _I, _P, ctypes.c_int], None),
    "es_supported": ([], ctypes.c_int),
    # layers, count, S, D, H, Hkv, hd, F, eps, x, cos, sin, kv buffers, caps, positions, threads
    "es_decode_stage": (
        [_P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _P, _P, _P, _P, _P, ctypes.c_int],
        ctypes.c_int,
    ),
}
_why_not = ""


def _cache_dir() -> Path:
    home = os.environ.get("EDGESHARD_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "edgeshard") / "kernels"


def _build(cc: str) -> Path:
    """Compile decode.c (which includes lowbit.c) into the cache (an atomic rename: nodes starting together
    may race) and return it."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-march=native"]
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.c")))
    # -march=native: the CPU's model and flags are part of the key (a home shared by other CPUs: no SIGILL)
    key = hashlib.sha256(sources + " ".join([cc, *flags, platform.machine(), cpu_identity()]).encode())
    target = _cache_dir() / f"lowbit-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE)], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot run here (`status()` says why)."""
    global _why_not
    if os.environ.get("EDGESHARD_NATIVE", "1") == "0":
        _why_not = "disabled by EDGESHARD_NATIVE=0"
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _why_not = f"AMX kernels are x86-only (this is {platform.machine()})"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        _why_not = "no C compiler found (install gcc, or set CC)"
        return None
    try:
        path = _build(cc)
        if why := untrusted_reason(path):  # node/trust.py: never load code another user could have written
            _why_not = f"refusing to load {path}: {why}"
            logging.getLogger("edgeshard.node").warning(
                "low-bit kernels: %s; using torch's kernels", _why_not
            )
            return None
        lib = ctypes.CDLL(str(path))  # ctypes.CDLL releases the GIL during calls
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        _why_not = f"building {SOURCE.name} with {cc} failed: {detail.splitlines()[-1] if detail else e!r}"
        return None
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if not lib.es_supported():
        _why_not = "this CPU or kernel has no AMX-BF16 tiles"
        return None
    return lib


def available() -> bool:
    """True when the kernels are built, loaded and runnable on this CPU."""
    return library() is not None


def status() -> str:
    """One line for diagnostics: which low-bit kernels this process uses, and why."""
    if available():
        return "AMX kernels (node/csrc/lowbit.c)"
    return f"torch kernels (AMX kernels unavailable: {_why_not})"


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
    rc = library().es_int4_mm(
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
    library().es_int8_mm(
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
