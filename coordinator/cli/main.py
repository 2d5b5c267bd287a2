"""The `edgeshard` command line (docs/CLI.md lists the whole surface): one table of subcommands.

Each row of `COMMANDS` names the module and the function that adds one subcommand's parser (with all of its
flags), its one-line help, and whether the command talks to nodes (then it also takes
`--cluster-key-file`/`--insecure`). Only the module of the command being run is imported (its flags need
the library's constants, and the library needs torch and gRPC): `edgeshard --help` and `--version` start in
a fraction of a second instead of seconds. The command functions parse flags into small option values
(cli/options.py) before calling the library.

One error path: every mistake a user can fix ends in one `edgeshard: error: ...` line on stderr, exit code 2
for usage (argparse's own complaints included) and 1 for failures; a traceback only with `--debug` (or
$EDGESHARD_DEBUG). gRPC's C core logs (handshake failures, GOAWAY) stay quiet unless `--debug`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
DEBUG_ENV = "EDGESHARD_DEBUG"

# (subcommand, module in this package, the function in it that adds the parser, help, talks to nodes),
# in `--help` order
COMMANDS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("models", "models", "add_parser", "the packaged models", False),
    ("run", "run", "add_parser", "one generation, streamed to stdout", True),
    # the node takes its own key flags (it refuses to run without)
    ("node", "node", "add_node_parser", "serve model shards over gRPC", False),
    # local nodes: an ephemeral key of their own
    (
        "cluster",
        "node",
        "add_cluster_parser",
        "N local node processes + a coordinator (classroom/demo)",
        False,
    ),
    ("demo", "node", "add_demo_parser", "pull the demo model, start a 3-node local cluster, answer", False),
    (
        "serve",
        "serve",
        "add_serve_parser",
        "coordinator + OpenAI-compatible HTTP API, shards kept loaded",
        True,
    ),
    ("chat", "serve", "add_chat_parser", "interactive chat with a running server (streams answers)", False),
    ("nodes", "discovery", "add_nodes_parser", "the nodes mDNS finds now, with what they report", True),
    (
        "plan",
        "discovery",
        "add_plan_parser",
        "placement dry run: layers per node, memory, predicted speed",
        True,
    ),
    ("doctor", "discovery", "add_doctor_parser", "check multicast, ports, ids, versions and clocks", True),
    (
        "secret",
        "secret",
        "add_parser",
        "make a cluster key (only nodes and coordinators holding it join)",
        False,
    ),
    ("top", "top", "add_top_parser", "a live view of a running server's cluster (HTTP)", False),
)


class Parser(argparse.ArgumentParser):
    """argparse with the one error line: `edgeshard: error: ...` and where to look, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"edgeshard: error: {message} (see `{self.prog} --help`)\n")


def version() -> str:
    """The installed package's version (from its metadata: no import of the library)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("edgeshard")
    except PackageNotFoundError:
        return "unknown"


def _command_in(argv: list[str]) -> str | None:
    """The subcommand `argv` names (the first word that is not a global flag), if any."""
    names = {row[0] for row in COMMANDS}
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The argument parser; with every flag for `command` ("*": for all of them), the others by name only."""
    parser = Parser(
        prog="edgeshard",
        description="Run one LLM across a cluster of cheap devices.",
        epilog="`edgeshard COMMAND --help` lists a command's flags; docs/CLI.md has them all.",
    )
    parser.add_argument("--version", action="version", version=f"edgeshard {version()}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show tracebacks and gRPC's own logs (also ${DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, builder, help_text, talks_to_nodes in COMMANDS:
        if command not in ("*", name):
            sub.add_parser(name, help=help_text)
            continue
        p = getattr(importlib.import_module(f"edgeshard.coordinator.cli.{module}"), builder)(sub)
        if talks_to_nodes:
            from edgeshard.node.security.channels import add_security_args

            add_security_args(p)
    return parser


def quiet_grpc() -> None:
    """Keep gRPC's C core (and absl) from printing its own log lines: our errors say what went wrong.

    Set before anything imports grpc; the node processes `cluster` starts inherit it. An explicit
    GRPC_VERBOSITY in the environment wins.
    """
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_TRACE", "")
    os.environ.setdefault("GLOG_minloglevel", "2")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `edgeshard` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug is global but accepted anywhere (`edgeshard run ... --debug` is what people type after a failure)
    debug = "--debug" in argv or bool(os.environ.get(DEBUG_ENV))
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the node processes `cluster` starts show theirs too
    else:
        quiet_grpc()
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    try:
        if args.command != "node":  # the node decides its own mode (and refuses to run without one)
            from edgeshard.node.security.channels import configure_from_args

            configure_from_args(args)  # --cluster-key-file / --insecure of commands that talk to nodes
        return args.func(args) or 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            raise
        code, message = describe(e)
        print(f"edgeshard: error: {message}", file=sys.stderr)
        return code


def describe(e: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error: usage mistakes 2, failures 1; unexpected errors say how to see more.

    Typed errors (the `EdgeshardError` tree) carry their own message. A few builtin errors reach here from
    libraries with messages of their own (a file that is not there, a port taken): those are shown as is.
    Anything else is a bug or an unforeseen case: its type and message, and `--debug` for the traceback.
    """
    from edgeshard.coordinator.errors import UserError
    from edgeshard.node.errors import EdgeshardError

    text = str(e).strip() or type(e).__name__
    if isinstance(e, UserError):
        return EXIT_USAGE, text
    if isinstance(e, (EdgeshardError, OSError)):  # OSError: FileNotFoundError, PermissionError, a port taken
        return EXIT_FAILURE, text
    return EXIT_FAILURE, f"{type(e).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
