"""The `node`, `cluster` and `demo` subcommands .

edgeshard node --port 50051 --model-dir ~/models      # serve shards over gRPC
edgeshard cluster --nodes 3 --model smollm2-135m --prompt "Hi"   # 3 local nodes, one generation, a table
edgeshard demo                                        # pull the demo model, 3 nodes, a chat answer
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from edgeshard.coordinator.cli.options import add_model_args, add_sampling_args
from edgeshard.coordinator.cli.run import add_template_args, stream_generation
from edgeshard.coordinator.cli.serve import add_http_args
from edgeshard.coordinator.errors import ClusterError, UserError

DEMO_MODEL = "smollm2-135m"
DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def add_node_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`node`: serve model shards over gRPC (its flags are the node's own, node/service/node_args.py)."""
    from edgeshard.node.service.node_args import add_node_args

    node = sub.add_parser("node", help="serve model shards over gRPC")
    add_node_args(node)
    node.set_defaults(func=cmd_node)
    return node


def add_cluster_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`cluster`: N local node processes and a coordinator (classroom/demo mode)."""
    cluster = sub.add_parser("cluster", help="N local node processes + a coordinator (classroom/demo mode)")
    cluster.add_argument("--nodes", type=int, required=True, help="node processes to start on 127.0.0.1")
    add_model_args(cluster)
    cluster.add_argument("--prompt", help="generate once for this prompt, then exit (without: keep serving)")
    add_template_args(cluster)  # --raw (the chat template is the default)
    add_sampling_args(cluster)
    cluster.add_argument("--threads", type=int, default=1, help="torch threads per node process")
    add_http_args(cluster)  # --http H:P (serve the OpenAI-compatible API when there is no --prompt), limits
    cluster.add_argument("--json", action="store_true", help="print a JSON summary on the last line")
    cluster.set_defaults(func=cmd_cluster)
    return cluster


def add_demo_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`demo`: pull the demo model, start a 3-node local cluster, stream an answer."""
    demo = sub.add_parser("demo", help="pull the demo model, start a 3-node local cluster, stream an answer")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--nodes", type=int, default=3)
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.set_defaults(func=cmd_demo)
    return demo


def cmd_node(args: argparse.Namespace) -> int:
    """`edgeshard node`."""
    from edgeshard.node.service.server import run_node

    try:
        return run_node(args)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_cluster(args: argparse.Namespace) -> int:
    """`edgeshard cluster`."""
    if args.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {args.nodes}")
    return asyncio.run(_cluster(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """`edgeshard demo`: `cluster --nodes 3 --model smollm2-135m --prompt ...`."""
    ns = argparse.Namespace(
        nodes=args.nodes,
        model=DEMO_MODEL,
        quant=None,
        prompt=args.prompt,
        raw=False,
        max_tokens=args.max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        threads=1,
        http=None,
        json=False,
    )
    print(
        f"edgeshard demo: {args.nodes} local nodes running {DEMO_MODEL}; prompt: {args.prompt}",
        file=sys.stderr,
    )
    return asyncio.run(_cluster(ns))


async def _cluster(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes
    from edgeshard.node.weights.checkpoint import open_checkpoint
    from edgeshard.node.weights.registry import resolve_model
    from edgeshard.node.weights.tokenizer import Tokenizer

    path = resolve_model(args.model)
    config = open_checkpoint(path).config
    num_layers = config.num_hidden_layers
    if args.nodes > num_layers:
        raise UserError(f"--nodes {args.nodes} exceeds the model's {num_layers} layers")
    tokenizer = Tokenizer.from_checkpoint(path)
    console = Console(stderr=True)
    # the nodes may open only what is under --model-dir: give them the model's own directory
    with LocalNodes(args.nodes, model_dir=path.parent, threads=args.threads) as cluster:
        try:
            deployment = await deploy(
                cluster.addresses, path.name, num_layers, args.quant, console=console, source=path
            )
        except ClusterError as e:
            raise ClusterError(f"{e}\nlog of the local nodes:\n{cluster.log_tail(0)}") from None
        try:
            before = await _stats(deployment)
            if args.prompt is None:
                from edgeshard.coordinator.cli.serve import serve_deployment

                return await serve_deployment(deployment, path, args)
            pipeline = await deployment.pipeline()
            try:
                code = await stream_generation(
                    args, pipeline, tokenizer, deployment.plan, context_length=config.max_position_embeddings
                )
            finally:
                await pipeline.aclose()
            after = await _stats(deployment)
            rows = node_rows(deployment, before, after)
            if pipeline.return_hops:  # the last hop, back to this coordinator
                rows.append(
                    {
                        "node": "coordinator",
                        "address": "",
                        "network_ms_per_step": round(pipeline.return_hop_s * 1e3 / pipeline.return_hops, 3),
                    }
                )
            out = Console(stderr=True) if args.json else Console()
            out.print(node_table(rows))
            return code
        finally:
            await deployment.close()


async def _stats(deployment) -> list:
    return [i.stats for i in await asyncio.gather(*(c.info() for c in deployment.clients))]


def node_rows(deployment, before: list, after: list) -> list[dict]:
    """Per node: layers, load seconds, compute and network milliseconds per step over the generation."""
    rows = []
    for entry, load_s, b, a in zip(deployment.plan, deployment.load_s, before, after, strict=True):
        steps = max(1, a.steps - b.steps)
        rows.append(
            {
                **entry,
                "load_s": round(load_s, 2),
                "steps": a.steps - b.steps,
                "compute_ms_per_step": round((a.compute_ms - b.compute_ms) / steps, 2),
                "network_ms_per_step": round((a.network_ms - b.network_ms) / steps, 3),
            }
        )
    return rows


def node_table(rows: list[dict]):
    """A rich table of `node_rows`."""
    from rich.table import Table

    table = Table(
        title="per node, ms per token (one decode step makes one token); network: the hop into the node"
    )
    for column in ("node", "address"):  # never cut: a cut address cannot be copied into --peers
        table.add_column(column, no_wrap=True)
    for column in ("layers", "quant", "load s", "compute ms", "network ms"):
        table.add_column(column, justify="left" if column in ("layers", "quant") else "right")
    for r in rows:
        if "start_layer" not in r:  # the coordinator: only the hop into it
            table.add_row(r["node"], r["address"], "", "", "", "", f"{r['network_ms_per_step']:.3f}")
            continue
        table.add_row(
            r["node"],
            r["address"],
            f"{r['start_layer']}-{r['end_layer'] - 1}",
            r["quant"],
            f"{r['load_s']:.2f}",
            f"{r['compute_ms_per_step']:.2f}",
            f"{r['network_ms_per_step']:.3f}",
        )
    return table
