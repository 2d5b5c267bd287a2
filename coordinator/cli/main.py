"""The `edgeshard` command line (docs/CLI.md lists the whole surface): one table of subcommands.

Each row of `COMMANDS` names the function that adds one subcommand's parser (with all of its flags) and
whether the command talks to nodes (then it also takes `--cluster-key-file`/`--insecure`). The command
functions live in this package, one module per group; they parse flags into small option values
(cli/options.py) before calling the library. Errors that a user can fix are printed as one line
(`edgeshard: error: ...`): exit code 2 for usage, 1 for failures; never a traceback unless EDGESHARD_DEBUG.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from edgeshard.coordinator.cli import discovery, models, node, run, secret, serve, top
from edgeshard.coordinator.errors import UserError
from edgeshard.node.errors import EdgeshardError

EXIT_USAGE = 2
AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]

# (subcommand, the function that adds its parser, whether it talks to nodes), in `--help` order
COMMANDS: tuple[tuple[str, AddParser, bool], ...] = (
    ("models", models.add_parser, False),
    ("run", run.add_parser, True),
    ("node", node.add_node_parser, False),  # the node takes its own key flags (it refuses to run without)
    ("cluster", node.add_cluster_parser, False),  # local nodes: an ephemeral key of their own
    ("demo", node.add_demo_parser, False),
    ("serve", serve.add_serve_parser, True),
    ("chat", serve.add_chat_parser, False),  # HTTP only
    ("nodes", discovery.add_nodes_parser, True),
    ("plan", discovery.add_plan_parser, True),
    ("doctor", discovery.add_doctor_parser, True),
    ("secret", secret.add_parser, False),
    ("top", top.add_top_parser, False),  # HTTP only: a live view of a server's /v1/cluster
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from edgeshard.node.security.channels import add_security_args

    parser = argparse.ArgumentParser(
        prog="edgeshard", description="Run one LLM across a cluster of cheap devices."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, add, talks_to_nodes in COMMANDS:
        p = add(sub)
        if talks_to_nodes:
            add_security_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgeshard` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "node":  # the node decides its own mode (and refuses to run without one)
            from edgeshard.node.security.channels import configure_from_args

            configure_from_args(args)  # --cluster-key-file / --insecure of commands that talk to nodes
        return args.func(args) or 0
    except UserError as e:
        print(f"edgeshard: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except (EdgeshardError, FileNotFoundError) as e:  # errors typed for the user: one line, no traceback
        if os.environ.get("EDGESHARD_DEBUG"):
            raise
        print(f"edgeshard: error: {e}", file=sys.stderr)
        return 1


if (
    __name__ == "__main__"
):  # python -m edgeshard.coordinator.cli.main (the package runs it too: cli/__main__.py)
    sys.exit(main())
