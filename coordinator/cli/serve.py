"""The `serve` and `chat` subcommands, and `cluster`'s HTTP path.

edgeshard serve --model smollm2-135m --local                     # every layer here, API on 127.0.0.1:8000
edgeshard serve --model smollm2-135m --peers a:50051,b:50051 --http 0.0.0.0:8000
edgeshard cluster --nodes 3 --model smollm2-135m --http 127.0.0.1:8000   # local nodes + the API
edgeshard chat --url http://127.0.0.1:8000                       # talk to it in the terminal
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from edgeshard.coordinator.cli.options import (
    add_model_args,
    add_placement_args,
    add_speculative_args,
    add_take_over_arg,
    add_where_args,
    claim_nodes,
    placement_options,
    speculation_factory,
)
from edgeshard.coordinator.errors import UserError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000  # loopback unless told otherwise
CHAT_HELP = (
    "type a message; /help lists the commands, /reset forgets the conversation, /exit (or Ctrl-D) leaves, "
    "Ctrl-C stops an answer"
)
CHAT_COMMANDS = {
    "/help": "this list",
    "/reset": "forget the conversation (the system prompt stays)",
    "/exit": "leave (also /quit and Ctrl-D)",
}
CHAT_MAX_TOKENS = 512  # an answer, not a novel: a small board makes a few tokens a second
CHAT_TEMPERATURE = 0.7  # varied but on topic; 1.0 wanders on a small model


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve`: a coordinator with the OpenAI-compatible HTTP API, shards kept loaded."""
    serve = sub.add_parser("serve", help="coordinator + OpenAI-compatible HTTP API, shards kept loaded")
    add_model_args(serve)
    add_where_args(serve, "run every layer in this process (the default)")
    add_placement_args(serve)  # --layers, --mdns-interface, --timeout, --cluster, --context, --sessions, ...
    add_http_args(serve)
    add_speculative_args(serve)
    add_take_over_arg(serve)
    serve.add_argument(
        "--threads", type=int, default=None, help="torch threads for --local (default: all cores)"
    )
    serve.set_defaults(func=cmd_serve)
    return serve


def add_chat_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`chat`: talk to a running server in the terminal."""
    chat = sub.add_parser("chat", help="interactive chat with a running server (streams answers)")
    chat.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="the server's address")
    chat.add_argument("--system", help="a system prompt that starts the conversation")
    chat.add_argument(
        "--max-tokens",
        type=int,
        default=CHAT_MAX_TOKENS,
        help=f"tokens per answer at most (default {CHAT_MAX_TOKENS})",
    )
    chat.add_argument(
        "--temperature",
        type=float,
        default=CHAT_TEMPERATURE,
        help=f"0 means greedy (default {CHAT_TEMPERATURE})",
    )
    chat.add_argument("--api-key", default=None, help="sent as a bearer token (default: $EDGESHARD_API_KEY)")
    chat.set_defaults(func=cmd_chat)
    return chat


def add_http_args(p: argparse.ArgumentParser) -> None:
    """--http and the admission limits (shared by serve and cluster)."""
    p.add_argument(
        "--http",
        default=None,
        metavar="H:P",
        help=f"HTTP API address (default {DEFAULT_HOST}:{DEFAULT_PORT}; use 0.0.0.0:P to serve the LAN)",
    )
    p.add_argument("--max-running", type=int, default=8, help="requests generating at once")
    p.add_argument(
        "--max-queued", type=int, default=32, help="requests waiting beyond those; more get HTTP 429"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="prompt tokens per step (default 128); smaller chunks stall the other requests' tokens less "
        "while a long prompt is read",
    )
    from edgeshard.coordinator.serving.http_security import add_http_security_args

    add_http_security_args(
        p
    )  # --api-key-file/--api-key/$EDGESHARD_API_KEY, --cors-origin, --allowed-host, TLS


def parse_http_address(text: str | None, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """`H:P`, `:P` or `P` -> (host, port); the host defaults to loopback."""
    text = (text or "").strip()
    host, _, port = text.rpartition(":") if ":" in text else ("", "", text)
    port = port or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http {text!r} is not host:port (e.g. 127.0.0.1:8000)")
    return host.strip("[]") or default_host, int(port)


def _http(args: argparse.Namespace) -> tuple[str, int]:
    try:
        return parse_http_address(args.http)
    except ValueError as e:
        raise UserError(str(e)) from None


def _bind(args: argparse.Namespace):
    """The listening socket of --http (bound before loading anything: a busy port fails at once)."""
    from edgeshard.coordinator.serving.http_server import bind

    try:
        return bind(*_http(args))
    except OSError as e:
        raise UserError(f"--http: {e}") from None


def _engine_kw(args: argparse.Namespace) -> dict:
    running, queued = getattr(args, "max_running", 8), getattr(args, "max_queued", 32)
    if running < 1 or queued < 0:
        raise UserError(f"--max-running must be >= 1 and --max-queued >= 0, got {running} and {queued}")
    kw = {"max_running": running, "max_queued": queued}
    chunk = getattr(args, "prefill_chunk", None)  # None: generate.PREFILL_CHUNK (not imported here: torch)
    if chunk is not None:
        if chunk < 1:
            raise UserError(f"--prefill-chunk must be >= 1, got {chunk}")
        kw["prefill_chunk"] = chunk
    speculation = speculation_factory(args)  # --speculative (serve): every request speculates
    if speculation is not None:
        kw["speculation"] = speculation
    return kw


def cmd_serve(args: argparse.Namespace) -> int:
    """`edgeshard serve`."""
    from edgeshard.coordinator.serving.http_security import http_security_from_args

    http_security_from_args(args)  # an empty key, or the LAN without one: refused before binding or loading
    claim_nodes(args, "serve")
    sock = _bind(args)
    try:
        return asyncio.run(_serve(args, sock))
    finally:
        sock.close()


async def _serve(args: argparse.Namespace, sock) -> int:
    from rich.console import Console

    from edgeshard.coordinator.discovery.members import parse_peers
    from edgeshard.coordinator.placement.gather import plan_for
    from edgeshard.coordinator.serving.assemble import discovered_engine, local_engine, peers_engine
    from edgeshard.coordinator.serving.http_server import run_server
    from edgeshard.node.weights.registry import resolve_model

    console = Console(stderr=True)
    kw = _engine_kw(args)
    # the planner budgets KV memory for what serve runs
    opts = placement_options(args, sessions=max(args.sessions, kw["max_running"]))
    if args.discover:
        served = await discovered_engine(args.model, args.quant, opts, console, **kw)
    elif args.peers:
        try:
            peers = parse_peers(args.peers)
        except ValueError as e:
            raise UserError(str(e)) from None
        plan = (
            await plan_for(opts, args.model, resolve_model(args.model), args.quant) if args.layers else None
        )
        ring = plan.addresses() if plan else peers  # every peer stays a candidate after a failure (spares)
        served = await peers_engine(
            ring, args.model, args.quant, console=console, plan=plan, candidates=peers, **kw
        )
    else:
        console.print(
            f"loading {args.model} in this process (--peers or --discover spread it over nodes)",
            soft_wrap=True,
        )
        served = await local_engine(args.model, args.quant, args.threads, **kw)
    from edgeshard.coordinator.serving.http_security import http_security_from_args

    return await run_server(served, sock, console, http_security=http_security_from_args(args))


async def serve_deployment(deployment, path: Path, args: argparse.Namespace) -> int:
    """`cluster` without --prompt: serve the HTTP API over an already deployed local cluster until Ctrl-C."""
    from edgeshard.coordinator.serving.assemble import deployment_engine
    from edgeshard.coordinator.serving.http_security import http_security_from_args
    from edgeshard.coordinator.serving.http_server import run_server

    http_security_from_args(args)  # an empty key, or the LAN without one: refused before binding
    sock = _bind(args)
    try:
        pipeline = await deployment.pipeline()
        try:
            served = deployment_engine(deployment, pipeline, path, args.model, **_engine_kw(args))
        except BaseException:
            await pipeline.aclose()
            raise
        return await run_server(served, sock, http_security=http_security_from_args(args))
    finally:
        sock.close()


# ---- chat -------------------------------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    """`edgeshard chat`."""
    from edgeshard.coordinator.errors import EdgeshardError
    from edgeshard.coordinator.sdk.client import Client
    from edgeshard.coordinator.serving.http_security import API_KEY_ENV

    with Client(args.url, api_key=args.api_key or os.environ.get(API_KEY_ENV)) as client:
        try:
            model = client.models()[0]["id"]
        except EdgeshardError as e:
            raise UserError(e.message) from None
        print(f"chatting with {model} at {client.url}; {CHAT_HELP}", file=sys.stderr)
        options = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        chat_repl(client, _lines(), sys.stdout, system=args.system, **options)
    return 0


def _lines() -> Iterator[str]:
    """Lines the user types (a prompt on a terminal); ends on Ctrl-D."""
    prompt = "you> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def chat_repl(
    client,
    lines: Iterator[str],
    out: TextIO,
    system: str | None = None,
    on_piece: Callable[[str], None] | None = None,
    **options,
) -> list[dict]:
    """Chat over `client`: each line is a user turn, each answer streams to `out`; returns the history.

    Lines starting with `/` are commands for this loop, never sent to the model: /help, /reset, /exit (an
    unknown one says so). A server error is printed and the chat goes on.
    """
    from edgeshard.coordinator.errors import ContextLengthError, EdgeshardError

    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/") and not text.startswith("//"):
            word = text.split()[0]
            if word not in ("/help", "/?"):
                out.write(f"unknown command {word}; ")
            out.write("commands: " + ", ".join(f"{c} {what}" for c, what in CHAT_COMMANDS.items()) + "\n")
            out.write("(start a message with // to send a line beginning with /)\n")
            continue
        if text.startswith("//"):
            text = text[1:]
        if not text:
            continue
        history.append({"role": "user", "content": text})
        stream = None
        try:
            stream = client.chat(history, stream=True, **options)
            for piece in stream:
                out.write(piece)
                out.flush()
                if on_piece:
                    on_piece(piece)
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except EdgeshardError as e:
            history.pop()  # the turn did not happen
            hint = " (type /reset to start over)" if isinstance(e, ContextLengthError) else ""
            out.write(f"error: {e.message}{hint}\n")
            continue
        finally:
            if stream is not None:
                stream.close()
        out.write("\n")
        history.append({"role": "assistant", "content": stream.result.text})
    return history
