"""How the C tests reach aarch64: natively on an aarch64 machine, else cross-built here and run under qemu-user."""

from __future__ import annotations

import shutil

import pytest

from edgeshard.node.lowbit import native


def aarch64_tools(name: str) -> tuple[list[str], list[str]]:
    """(compiler command, runner prefix) for kernel set `name` on aarch64; skips the test without the tools."""
    if native._is_arm64() and not native.runnable(name):
        return [native._compiler()], []
    if shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64"):
        return ["aarch64-linux-gnu-gcc", "-static"], ["qemu-aarch64"]
    pytest.skip(
        "needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)"
    )
