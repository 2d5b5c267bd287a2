#!/usr/bin/env python3
"""The import rules of the house, checked from the source (no import of the package needed).

1. No file of node/ or coordinator/ imports another in a loop (function-local imports count too: a loop
   hidden inside a function is still a loop).
2. node/ never imports coordinator/.
3. Each side is a stack of rooms, and a room imports only rooms below it (LAYERS, top first). Rooms on one
   line are siblings: neither imports the other.

`python scripts/check_layers.py` prints every breach and exits 1; `make lint` and the test suite run it.
docs/architecture.md explains the layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"edgeshard.node": ROOT / "node", "edgeshard.coordinator": ROOT / "coordinator"}

# Top first. A module of a room may import modules of its own room and of any room listed below it.
LAYERS: dict[str, list[list[str]]] = {
    "edgeshard.node": [
        ["service"],  # the gRPC server, the ring, batching, the next hop, loading a shard
        ["presence"],  # mDNS adverts, capability, the microbenchmark
        ["weights"],  # checkpoints, GGUF, the loader, tokenizer, registry, model dir
        ["security"],  # cluster key, TLS channels, call auth, advert proofs
        ["wire"],  # messages, tensors on the wire, limits, gRPC options
        ["model"],  # config, the decoder stage, KV cache, sampling, executor, cost
        ["lowbit"],  # low-bit layers, formats, native kernels
        ["trust"],  # may code be loaded from this path? (native kernels; node/trust.py)
        ["errors"],
    ],
    "edgeshard.coordinator": [
        ["cli"],  # the command line
        ["sdk"],  # Client, AsyncClient, LocalCluster, local node processes
        ["serving"],  # engine, admission, HTTP API, assembling a server
        ["recovery"],  # the resilient pipeline, re-planning, liveness
        ["pipeline"],  # stage clients, the remote pipeline, deploy, the generation loop
        ["placement"],  # plans, the planner, the cost model, links
        ["discovery"],  # mDNS browsing, members
        ["errors"],
    ],
}
WIRE_GENERATED = {"edgeshard.node.wire.edgeshard_pb2", "edgeshard.node.wire.edgeshard_pb2_grpc"}


def modules() -> dict[str, Path]:
    """Every module of the two packages: dotted name -> file."""
    found = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports (absolute or relative, at any depth of the file)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            # the longest known prefix: `from a.b import c` names module a.b.c or a name in a.b
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t not in WIRE_GENERATED:
                out.add(t)
    return out


def room(module: str) -> tuple[str, str] | None:
    """(package, room) of a module: the first component below edgeshard.node / edgeshard.coordinator."""
    for pkg in PACKAGES:
        if module.startswith(pkg + "."):
            return pkg, module[len(pkg) + 1 :].split(".")[0]
    return None


def rank(pkg: str, name: str) -> tuple[int, int] | None:
    """(level from the top, index within the level) of room `name`, None when it is not listed."""
    for level, rooms in enumerate(LAYERS[pkg]):
        if name in rooms:
            return level, rooms.index(name)
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def breaches() -> list[str]:
    """Every rule broken, one line each."""
    mods = modules()
    known = set(mods)
    # package __init__ files re-export from their own room; they are not edges between rooms
    graph = {m: imports(m, p, known) for m, p in mods.items()}
    problems = [f"import loop: {' <-> '.join(c)}" for c in cycles(graph)]
    for src, targets in sorted(graph.items()):
        src_room = room(src)
        for dst in sorted(targets):
            if src.startswith("edgeshard.node") and dst.startswith("edgeshard.coordinator"):
                problems.append(f"{src} imports {dst}: node/ never imports coordinator/")
                continue
            dst_room = room(dst)
            if src_room is None or dst_room is None or src_room[0] != dst_room[0]:
                continue  # package roots, and coordinator -> node (always allowed)
            pkg = src_room[0]
            if src_room[1] == dst_room[1]:
                continue
            a, b = rank(pkg, src_room[1]), rank(pkg, dst_room[1])
            if a is None or b is None:
                problems.append(f"{src} imports {dst}: room not listed in LAYERS of scripts/check_layers.py")
            elif a[0] >= b[0]:
                problems.append(
                    f"{src} imports {dst}: {src_room[1]}/ may import only rooms below it "
                    f"({' > '.join('|'.join(r) for r in LAYERS[pkg])})"
                )
    return problems


def main() -> int:
    problems = breaches()
    for p in problems:
        print(p)
    print(f"{len(problems)} import-rule breaches" if problems else "imports: no loops, every layer rule kept")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
