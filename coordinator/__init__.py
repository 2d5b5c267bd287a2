from .sdk import AsyncClient, Client, LocalCluster  # noqa: F401  (the SDK; see sdk.py)
