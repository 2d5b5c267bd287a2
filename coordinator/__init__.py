"""The coordinator: discovery, placement, the pipeline driver, recovery, serving, the SDK and the CLI.

`from edgeshard.coordinator import Client, AsyncClient, LocalCluster` is the SDK's public face. The names are
loaded on first use, so importing any coordinator module (the CLI's `--help` among them) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["AsyncClient", "Client", "LocalCluster"]

if TYPE_CHECKING:
    from edgeshard.coordinator.sdk import AsyncClient, Client, LocalCluster


def __getattr__(name: str):
    if name in __all__:
        from edgeshard.coordinator import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
