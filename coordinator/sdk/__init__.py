"""The Python SDK: `Client` / `AsyncClient` for an edgeshard server, and `LocalCluster` for a whole cluster
on this machine (notebooks, classrooms, tests). The errors are those of `edgeshard.coordinator.errors`."""

from edgeshard.coordinator.errors import (
    BadRequestError,
    ClusterBusyError,
    ContextLengthError,
    EdgeshardError,
    ModelNotFoundError,
    ServerUnavailableError,
)
from edgeshard.coordinator.sdk.async_client import AsyncClient, AsyncTextStream
from edgeshard.coordinator.sdk.client import Client, TextStream
from edgeshard.coordinator.sdk.client_base import Result, Usage
from edgeshard.coordinator.sdk.local_cluster import LocalCluster

__all__ = [
    "AsyncClient",
    "AsyncTextStream",
    "BadRequestError",
    "Client",
    "ClusterBusyError",
    "ContextLengthError",
    "EdgeshardError",
    "LocalCluster",
    "ModelNotFoundError",
    "Result",
    "ServerUnavailableError",
    "TextStream",
    "Usage",
]
