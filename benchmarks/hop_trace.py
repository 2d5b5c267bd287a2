"""Where one decode token's time goes on a ring of loopback nodes: a timestamp trace in every process.

    python benchmarks/hop_trace.py                 # 3 nodes, 64 tokens, 3 runs with the token feed and 3 without
    python benchmarks/hop_trace.py --nodes 2 --tokens 128

Sets EDGESHARD_HOP_TRACE (node/service/hop_trace.py) for this process and the node processes it starts, runs
one greedy sequence at a time, alternating a pipeline with the direct token feed and one without, then joins
the processes' stamps (wall clock, one machine) per step and prints the median of each segment of the token
path: coordinator -> node 1 -> ... -> node N -> (coordinator -> node 1 | node 1). Segments:

* `gRPC a->b`: from the sender's `write` (the message handed to gRPC) to the receiver's handler seeing it
  (both event loops, gRPC's own threads, the socket, and the receiver waking up),
* `queue`: arrival to the start of the batch (the stage loop noticing), `compute`: the stage's forward,
* `emit`/`feed`: forward done to the output handed to the writer task; `writer`: to the writer calling gRPC,
* `publish -> coordinator`: the last node's Result until the coordinator's reader has it,
* `coordinator`: the result in hand to the next step written (waking the step, the generation loop).

For scale it also measures two floors, from a busy process to one that has idled 2 or 8 ms (the time a node
idles in a ring), send to receive, in two plain processes: a raw socket message, and a gRPC message of a hidden
state's size on one long-lived grpc.aio stream (no edgeshard code: what any gRPC hop costs here, including
grpc.aio's poller thread waking the event loop).

Writes benchmarks/results/hop_trace.json. Timings on a shared machine are noisy: compare segments within a run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

# the spawned child of socket_floor imports this module again: it inherits the variable, so no second directory
TRACE_DIR = os.environ.get("EDGESHARD_HOP_TRACE") or tempfile.mkdtemp(prefix="edgeshard-hop-trace-")
os.environ["EDGESHARD_HOP_TRACE"] = TRACE_DIR  # before edgeshard is imported: hop_trace reads it once

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import torch  # noqa: E402

from edgeshard.coordinator.pipeline.deploy import deploy  # noqa: E402
from edgeshard.coordinator.pipeline.generate import Sequence, generate  # noqa: E402
from edgeshard.coordinator.pipeline.remote import RemotePipeline  # noqa: E402
from edgeshard.coordinator.sdk.local_nodes import LocalNodes  # noqa: E402
from edgeshard.node.model.sampling import SamplingParams  # noqa: E402
from edgeshard.node.service import hop_trace  # noqa: E402
from edgeshard.node.weights.checkpoint import open_checkpoint  # noqa: E402
from edgeshard.node.weights.registry import resolve_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hop_trace.json"
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3717, 7018, 2, 198, 1, 4093, 198, 1780]


def _echo(sock, n: int) -> None:
    """The receiving end of `socket_floor`: stamp each message's arrival, answer, report the median."""
    import struct

    lat = []
    for _ in range(n):
        sent = struct.unpack("q", sock.recv(8))[0]
        lat.append(time.time_ns() - sent)
        sock.sendall(b"k")
    sock.sendall(struct.pack("q", int(statistics.median(lat))))


def socket_floor(idle_s: float, n: int = 200) -> float:
    """Median ms from a send (by a process that computed for `idle_s`) to its receipt by a process that
    idled meanwhile: the wake-up and the kernel's part of a hop, without gRPC or Python on top."""
    import multiprocessing
    import socket
    import struct

    a, b = socket.socketpair()
    child = multiprocessing.get_context("spawn").Process(target=_echo, args=(b, n))
    child.start()
    b.close()
    for _ in range(n):
        t = time.perf_counter()
        while time.perf_counter() - t < idle_s:  # the sender computes while the receiver idles
            pass
        a.sendall(struct.pack("q", time.time_ns()))
        a.recv(1)
    median_ns = struct.unpack("q", a.recv(8))[0]
    child.join()
    a.close()
    return median_ns / 1e6


def segments(n: int, fed: bool) -> list[tuple[str, tuple, tuple]]:
    """The token path as (label, (role, event, step offset), (role, event, step offset)); roles: "c", 1..n.
    A step's stamps carry its start position; the next step's are at offset 1."""
    path: list[tuple[str, tuple, tuple]] = []
    for i in range(1, n + 1):
        path += [
            (f"n{i} queue", (i, "recv", 0), (i, "batch", 0)),
            (f"n{i} compute", (i, "batch", 0), (i, "computed", 0)),
        ]
        if i < n:
            path += [
                (f"n{i} emit", (i, "computed", 0), (i, "emit", 0)),
                (f"n{i} writer", (i, "emit", 0), (i, "write", 0)),
                (f"gRPC n{i}->n{i + 1}", (i, "write", 0), (i + 1, "recv", 0)),
            ]
    if fed:
        path += [
            (f"n{n} feed", (n, "computed", 0), (n, "feed", 1)),
            (f"n{n} writer", (n, "feed", 1), (n, "write", 1)),
            (f"gRPC n{n}->n1", (n, "write", 1), (1, "recv", 1)),
        ]
    else:
        path += [
            (f"n{n} publish", (n, "computed", 0), (n, "publish", 0)),
            (f"gRPC n{n}->coordinator", (n, "publish", 0), ("c", "c.result", 0)),
            ("coordinator", ("c", "c.result", 0), ("c", "c.put", 1)),
            ("gRPC coordinator->n1", ("c", "c.put", 1), (1, "recv", 1)),
        ]
    return path


def load(pids: dict[int, object]) -> dict[str, dict[tuple, int]]:
    """Stamps per session: (role, event, start) -> ns (the first of each)."""
    hop_trace.flush()
    out: dict[str, dict[tuple, int]] = defaultdict(dict)
    for f in Path(TRACE_DIR).glob("trace-*.tsv"):
        for line in f.read_text().splitlines():
            t, pid, event, session, start = line.split("\t")
            role = pids.get(int(pid))
            if role is not None and session:
                out[session].setdefault((role, event, int(start)), int(t))
    return out


def analyse(stamps: dict[tuple, int], n: int, fed: bool, first: int, last: int) -> dict[str, list[float]]:
    """Per segment, its length (ms) for every decode step from `first` to `last - 1`."""
    got: dict[str, list[float]] = defaultdict(list)
    for s in range(first, last):
        cycle_a, cycle_b = stamps.get((1, "recv", s)), stamps.get((1, "recv", s + 1))
        if cycle_a is None or cycle_b is None:
            continue
        got["step (n1 recv -> n1 recv)"].append((cycle_b - cycle_a) / 1e6)
        for label, (ra, ea, oa), (rb, eb, ob) in segments(n, fed):
            a, b = stamps.get((ra, ea, s + oa)), stamps.get((rb, eb, s + ob))
            if a is not None and b is not None:
                got[label].append((b - a) / 1e6)
    return got


async def main_async(args) -> dict:
    torch.set_num_threads(1)
    path = resolve_model(args.model)
    num_layers = open_checkpoint(path).config.num_hidden_layers
    out: dict[str, dict[str, list[float]]] = {"fed": defaultdict(list), "unfed": defaultdict(list)}
    with LocalNodes(args.nodes, model_dir=path.parent, threads=1, name="trace-") as cluster:
        pids = {os.getpid(): "c", **{p.pid: i + 1 for i, p in enumerate(cluster.procs)}}
        d = await deploy(cluster.addresses, path.name, num_layers, args.quant)
        pipes = {"fed": await d.pipeline(), "unfed": RemotePipeline(d.clients, d.plan_id, feed=False)}
        await pipes["unfed"].start()
        sessions: dict[str, list[str]] = {"fed": [], "unfed": []}
        try:
            for pipe in pipes.values():  # warm-up
                seq = Sequence(PROMPT, SamplingParams(), 8)
                async for _ in generate(pipe, seq):
                    pass
            for _ in range(args.runs):
                for name, pipe in pipes.items():
                    seq = Sequence(PROMPT, SamplingParams(), args.tokens)
                    async for _ in generate(pipe, seq):
                        pass
                    sessions[name].append(seq.session_id)
        finally:
            for pipe in pipes.values():
                await pipe.aclose()
            await d.close()
    # the nodes flushed their traces when each session ended, and at exit
    time.sleep(0.2)
    stamps = load(pids)
    first = len(PROMPT) + 2  # skip the first decode steps (the feed starts; caches warm)
    for name in ("fed", "unfed"):
        for sid in sessions[name]:
            for label, values in analyse(stamps[sid], args.nodes, name == "fed", first, first + 40).items():
                out[name][label] += values
    return {k: {label: statistics.median(v) for label, v in rows.items()} for k, rows in out.items()}


HIDDEN_BYTES = 576 * 4  # a hidden state of the demo model on the wire (f32)


def _grpc_echo(conn, n: int) -> None:
    """The receiving end of `grpc_floor`: a grpc.aio server whose one stream stamps each message's arrival."""
    import struct

    import grpc

    async def serve() -> None:
        lat: list[int] = []

        async def echo(requests, _context):
            async for raw in requests:
                lat.append(time.time_ns() - struct.unpack("q", raw[:8])[0])
                yield b"k" if len(lat) < n else struct.pack("q", int(statistics.median(lat)))

        ident = lambda b: b  # noqa: E731 (bytes in, bytes out: no protobuf)
        handler = grpc.method_handlers_generic_handler(
            "floor.Echo",
            {"Echo": grpc.stream_stream_rpc_method_handler(echo, ident, ident)},
        )
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        while len(lat) < n:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await server.stop(None)

    asyncio.run(serve())


def grpc_floor(idle_s: float, n: int = 200) -> float:
    """Median ms from a grpc.aio stream write (by a process that computed for `idle_s`) to the receiving
    process's handler seeing the message: the floor of a gRPC hop on this machine, without edgeshard."""
    import multiprocessing
    import struct

    import grpc

    parent, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_grpc_echo, args=(child_end, n))
    child.start()
    port = parent.recv()

    async def send() -> float:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            ident = lambda b: b  # noqa: E731
            call = ch.stream_stream("/floor.Echo/Echo", ident, ident)()
            reply = b""
            for _ in range(n):
                t = time.perf_counter()
                while time.perf_counter() - t < idle_s:  # the sender computes while the receiver idles
                    pass
                await call.write(struct.pack("q", time.time_ns()) + bytes(HIDDEN_BYTES))
                reply = await call.read()
            await call.done_writing()
            return struct.unpack("q", reply)[0] / 1e6

    try:
        return asyncio.run(send())
    finally:
        child.join(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default=None)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--keep", action="store_true", help="keep the raw trace files (their directory is printed)"
    )
    args = p.parse_args(argv)
    args.tokens = max(args.tokens, 48)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    floor = {f"socket after {ms} ms idle": socket_floor(ms / 1e3) for ms in (2, 8)}
    floor |= {f"gRPC stream after {ms} ms idle": grpc_floor(ms / 1e3) for ms in (2, 8)}
    rows = asyncio.run(main_async(args))
    from rich.console import Console
    from rich.table import Table

    t = Table(
        "segment", "with feed (ms)", "without (ms)", title=f"one decode token, {args.nodes} nodes, median"
    )
    labels = list(dict.fromkeys([*rows["unfed"], *rows["fed"]]))
    for label in labels:
        f, u = rows["fed"].get(label), rows["unfed"].get(label)
        t.add_row(label, "" if f is None else f"{f:.3f}", "" if u is None else f"{u:.3f}")
    Console().print(t)
    for label, ms in floor.items():
        how = "raw socket" if label.startswith("socket") else f"grpc.aio stream, {HIDDEN_BYTES} bytes"
        print(f"{label}: {ms:.3f} ms (send -> receive, {how}, between two plain processes)")
    report = {
        "model": args.model,
        "nodes": args.nodes,
        "tokens": args.tokens,
        "runs": args.runs,
        "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "load_avg": os.getloadavg(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "median_ms": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in rows.items()},
        "transport_floor_ms": {k: round(v, 4) for k, v in floor.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.keep:
        print(f"raw traces in {TRACE_DIR}")
        return 0
    with contextlib.suppress(OSError):
        for f in Path(TRACE_DIR).glob("trace-*.tsv"):
            f.unlink()
        Path(TRACE_DIR).rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
