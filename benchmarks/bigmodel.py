"""Big model on small nodes: a Llama-shaped Q4_0 GGUF with random weights, shipped to 4 nodes with empty model
directories and a --memory-limit well below the model's size.

    python benchmarks/bigmodel.py                 # ~1.5B parameters (about 0.9 GB), 4 nodes, 32 tokens
    python benchmarks/bigmodel.py --size 0.5b     # smaller: ~0.5B
    python benchmarks/bigmodel.py --size tiny --tokens 8   # a smoke run in seconds

The model is written in a temporary directory (seeded random Q4_0 blocks, F32 norms, an SPM-style vocabulary
of placeholder tokens so llama.cpp can load it too) and deleted afterwards; it is never committed. Reported:
model size; per node its layers, weight bytes, bytes shipped, ship seconds against bytes / the link rate the
coordinator measured (coordinator/placement/links.py, the cluster's TLS, same loopback), load seconds, peak
resident memory (VmHWM) against baseline + weight bytes; the cluster's decode tok/s; and, when
$LLAMA_BENCH names a llama-bench binary (or --llama-bench PATH), llama.cpp's tg tok/s on the same file in one process
with one thread (each node runs one torch thread too). Writes benchmarks/results/bigmodel.json.

Memory figures: `idle` is a node's resident memory after start-up with no shard (Python, torch, gRPC);
`peak` is its high-water mark (VmHWM) over shipping, loading and decoding, split by phase (the mark is reset
between them through /proc/PID/clear_refs where the kernel allows it). The target is
peak <= idle + RUNTIME_MB + 1.15 x the shard's weight bytes, RUNTIME_MB being the fixed runtime baseline
measured with `--size tiny` (docs/shipping.md: the kernel libraries mapped at the first load, the decode's
scratch, KV cache and gRPC buffers; it does not grow with the shard).

`--kill` then measures failure recovery with shipping: a fifth node with an empty model dir waits as the
spare, the second node is killed mid-generation, and the time from the kill to the next token is reported
(the spare gets the lost stage's tensors from the coordinator's file: no survivor holds them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bigmodel.json"
LLAMA_BENCH = Path(os.environ.get("LLAMA_BENCH", "llama-bench"))  # a llama.cpp build (see docs/kernels.md)
# hidden, layers, ffn, heads, kv heads, vocab
SIZES = {
    "1.5b": (2048, 24, 8192, 32, 8, 32000),
    "0.5b": (1536, 14, 4096, 24, 8, 32000),
    "tiny": (512, 8, 1536, 8, 4, 32000),
}
RUNTIME_MB = 64  # the fixed runtime baseline over idle (measured: --size tiny, see docs/shipping.md)
PROMPT = [1, 450, 4996, 310, 278, 3186, 338, 263, 1243, 2462, 29892, 322, 306, 763, 372, 29889]


def params(size: str) -> int:
    d, n, f, h, kv, v = SIZES[size]
    hd = d // h
    layer = d * d * 2 + 2 * d * kv * hd + 3 * d * f
    return n * layer + 2 * v * d


def benchmark_model(model: str, stack: contextlib.AsyncExitStack | contextlib.ExitStack) -> Path:
    """The checkpoint of a benchmark's `--model`: a registry name or a path, or `random-<size>`: a random-weight
    model of one of SIZES, written for this run into a temporary directory that `stack` removes."""
    if not model.startswith("random-"):
        from edgeshard.node.weights.registry import resolve_model

        return resolve_model(model)

    size = model.removeprefix("random-")
    if size not in SIZES:
        raise SystemExit(f"--model random-SIZE takes a size of benchmarks/bigmodel.py: {', '.join(SIZES)}")
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeshard-bench-"))) / f"{model}.gguf"
    print(f"writing {path.name} ({params(size) / 1e9:.2f}B parameters, random weights, Q4_0)")
    write_model(path, size)
    return path


def write_model(path: Path, size: str, seed: int = 0) -> None:
    """A Llama GGUF with random Q4_0 weights (scales keep activations in range) and F32 norms."""
    import gguf

    d, n, f, h, kv, v = SIZES[size]
    hd = d // h
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"edgeshard-random-{size}")
    w.add_block_count(n)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"tok{i}" for i in range(v - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * v)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (v - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes: list[tuple[str, tuple[int, int] | tuple[int], bool]] = [("token_embd.weight", (v, d), True)]
    for i in range(n):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (d,), False),
            (f"blk.{i}.attn_q.weight", (h * hd, d), True),
            (f"blk.{i}.attn_k.weight", (kv * hd, d), True),
            (f"blk.{i}.attn_v.weight", (kv * hd, d), True),
            (f"blk.{i}.attn_output.weight", (d, h * hd), True),
            (f"blk.{i}.ffn_norm.weight", (d,), False),
            (f"blk.{i}.ffn_gate.weight", (f, d), True),
            (f"blk.{i}.ffn_up.weight", (f, d), True),
            (f"blk.{i}.ffn_down.weight", (d, f), True),
        ]
    shapes += [("output_norm.weight", (d,), False), ("output.weight", (v, d), True)]
    q4 = gguf.GGMLQuantizationType.Q4_0
    for name, shape, quantized in shapes:
        if quantized:
            nbytes = shape[0] * shape[1] // 32 * 18
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=q4)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, quantized in shapes:
        if not quantized:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // 32, 18), dtype=np.uint8)
        # weight = scale * (nibble - 8): std about 4.6 x scale; aim for 0.5/sqrt(fan_in) (1/sqrt(d) for tables)
        fan_in = shape[1]
        scale = (0.02 if name == "token_embd.weight" else 0.5 / np.sqrt(fan_in)) / 4.6
        blocks[:, :2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
        w.write_tensor_data(blocks)
    w.close()


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its VmRSS (Linux: `5` to /proc/PID/clear_refs); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def llama_bench(path: Path, exe: Path, tokens: int) -> float | None:
    """llama.cpp's token-generation rate on `path` with one thread (tok/s), or None when it did not run."""
    try:
        out = subprocess.run(
            [str(exe), "-m", str(path), "-t", "1", "-p", "0", "-n", str(tokens), "-r", "2", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        rows = json.loads(out.stdout)
        return float(rows[0]["avg_ts"])
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired) as e:
        print(f"llama-bench did not run: {e}")
        return None


async def run_cluster(path: Path, args, work: Path) -> dict:
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.pipeline.generate import Sequence, generate
    from edgeshard.coordinator.placement.links import measure_links
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes
    from edgeshard.node.model.sampling import SamplingParams
    from edgeshard.node.weights.slice import build_manifest

    size = path.stat().st_size
    limit = int(size * args.limit_fraction)
    dirs = [work / f"node{i}" for i in range(args.nodes)]
    for d in dirs:
        d.mkdir()
    node_args = ["--no-benchmark", "--memory-limit", str(limit)]
    n_layers = SIZES[args.size][1]
    t = time.perf_counter()
    build_manifest(path, path.name)  # hashing the file: once per file (memoized for deploy)
    manifest_s = time.perf_counter() - t
    n_procs = args.nodes + (1 if args.kill else 0)  # --kill: the last one is the spare, outside the plan
    if args.kill:
        dirs.append(work / "spare")
        dirs[-1].mkdir()
    with LocalNodes(n_procs, model_dirs=dirs, threads=1, name="big", node_args=node_args) as c:
        time.sleep(1.0)
        procs, addresses = c.procs[: args.nodes], c.addresses[: args.nodes]
        baseline = [rss(p.pid)[0] for p in procs]
        links = await measure_links(addresses)
        phased = all(reset_peak(p.pid) for p in procs)
        t = time.perf_counter()
        d = await deploy(addresses, path.name, n_layers, None, source=path)
        deploy_s = time.perf_counter() - t
        after_load = [rss(p.pid) for p in procs]
        infos = [await cl.info() for cl in d.clients]
        if phased:
            for p in procs:
                reset_peak(p.pid)
        try:
            pipe = await d.pipeline()
            seq = Sequence(PROMPT, SamplingParams(), args.tokens)
            toks = [tok async for tok in generate(pipe, seq)]
            await pipe.aclose()
        finally:
            await d.close()
        after_decode = [rss(p.pid) for p in procs]
        kept = [sum(p.stat().st_size for p in dd.rglob("*") if p.is_file()) for dd in dirs[: args.nodes]]
        kill = await kill_to_next_token(c, path, n_layers, args) if args.kill else None
    nodes = []
    for i, entry in enumerate(d.plan):
        link = links[entry["address"]]
        r = d.shipped[i]
        peak = max(after_load[i][1], after_decode[i][1])
        w = entry["weight_bytes"]
        nodes.append(
            {
                **entry,
                "memory_limit": limit,
                "kernels": list(infos[i].shard.kernels),  # what the loaded layers run on (ShardInfo.kernels)
                "process_kernels": infos[i].capabilities.kernels,
                "link_mb_per_s": round(link.mbps, 1),
                "ship_s_at_link_rate": round(r.shipped_bytes / (link.mbps * 1e6), 2) if r else 0.0,
                "load_s": round(d.load_s[i], 2),
                "baseline_rss": baseline[i],
                "rss_after_load": after_load[i][0],
                "peak_rss": peak,
                "peak_rss_ship_load": after_load[i][1] if phased else None,
                "peak_rss_decode": after_decode[i][1] if phased else None,
                "peak_over_baseline_per_weight_byte": round((peak - baseline[i]) / w, 3),
                # what the runtime adds beyond the idle node and the weights (load temporaries, KV, activations)
                "runtime_overhead_bytes": peak - baseline[i] - w,
                "target_bytes": baseline[i] + RUNTIME_MB * 2**20 + int(1.15 * w),
                "within_target": peak <= baseline[i] + RUNTIME_MB * 2**20 + 1.15 * w,
                "model_dir_bytes": kept[i],
            }
        )
    return {
        "tokens": len(toks),
        "decode_tok_per_s": round(seq.decode_tok_per_s, 2),
        "ttft_s": round(seq.ttft_s, 2),
        "deploy_s": round(deploy_s, 2),
        "manifest_s": round(manifest_s, 2),
        "runtime_mb": RUNTIME_MB,
        "nodes": nodes,
        "kill": kill,
    }


async def kill_to_next_token(c, path: Path, n_layers: int, args) -> dict:
    """Deploy again on the plan's nodes (nothing ships: they hold their slices), generate, kill the second
    node after a few tokens; the spare (empty model dir) gets the lost stage shipped and loaded. Seconds
    from the kill to the next token, and what the recovery did."""
    from edgeshard.coordinator.pipeline.deploy import deploy
    from edgeshard.coordinator.pipeline.generate import Sequence, generate
    from edgeshard.coordinator.recovery.resilient import RecoveryPolicy, resilient
    from edgeshard.node.model.sampling import SamplingParams

    addresses = c.addresses[: args.nodes]
    d = await deploy(addresses, path.name, n_layers, None, source=path)
    pipe = resilient(d, await d.pipeline(), path, candidates=c.addresses, policy=RecoveryPolicy(retry_s=1.0))
    killed_at, gap, n = 0.0, None, 0
    try:
        async for _tok in generate(pipe, Sequence(PROMPT, SamplingParams(), 12)):
            n += 1
            if killed_at and gap is None:
                gap = time.perf_counter() - killed_at
            if n == 4:
                c.procs[1].kill()
                killed_at = time.perf_counter()
        events = [e if isinstance(e, dict) else e.to_dict() for e in pipe.recoveries]
    finally:
        await pipe.aclose()
        await d.close()
    shipped = next((e for e in events[-1]["plan"] if e["address"] == c.addresses[-1]), {}) if events else {}
    return {
        "kill_to_next_token_s": round(gap, 2) if gap is not None else None,
        "tokens": n,
        "spare_shipped_bytes": shipped.get("shipped_bytes"),
        "spare_ship_s": shipped.get("ship_s"),
        "recovery": events[-1] if events else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="1.5b")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--limit-fraction",
        type=float,
        default=0.4,
        help="each node's --memory-limit as a fraction of the file",
    )
    ap.add_argument(
        "--kill", action="store_true", help="then kill a node mid-generation (a spare gets shipped)"
    )
    ap.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeshard-bigmodel-") as tmp:
        work = Path(tmp)
        path = work / f"random-{args.size}-q4_0.gguf"
        t = time.perf_counter()
        write_model(path, args.size, args.seed)
        print(
            f"wrote {path.name}: {path.stat().st_size / 1e9:.2f} GB, {params(args.size) / 1e9:.2f}B parameters "
            f"in {time.perf_counter() - t:.1f} s"
        )
        cluster = asyncio.run(run_cluster(path, args, work))
        ref = llama_bench(path, args.llama_bench, args.tokens) if args.llama_bench.exists() else None
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})",
            "size": args.size,
            "parameters": params(args.size),
            "file_bytes": path.stat().st_size,
            "nodes": args.nodes,
            **cluster,
            "llama_bench_tg_tok_per_s": ref,
            "vs_llama_cpp": round(cluster["decode_tok_per_s"] / ref, 3) if ref else None,
        }
    print(
        f"\nmodel {args.size}: {result['parameters'] / 1e9:.2f}B params, {result['file_bytes'] / 1e9:.2f} GB; "
        f"{args.nodes} nodes, --memory-limit {result['nodes'][0]['memory_limit'] / 1e9:.2f} GB each"
    )
    head = f"{'node':6} {'layers':>7} {'kernels':>8} {'weights MB':>10} {'shipped MB':>10} {'ship s':>7} {'at link s':>9} {'load s':>7} {'idle MB':>8} {'peak MB':>8} {'(peak-idle)/w':>13} {'over MB':>7} {'target MB':>9} {'dir MB':>7}"
    print(head)
    for n in result["nodes"]:
        print(
            f"{n['node']:6} {n['start_layer']:>3}-{n['end_layer'] - 1:<3} {','.join(n['kernels']):>8} {n['weight_bytes'] / 1e6:>10.1f} "
            f"{n['shipped_bytes'] / 1e6:>10.1f} {n['ship_s']:>7.2f} {n['ship_s_at_link_rate']:>9.2f} {n['load_s']:>7.2f} "
            f"{n['baseline_rss'] / 1e6:>8.0f} {n['peak_rss'] / 1e6:>8.0f} {n['peak_over_baseline_per_weight_byte']:>13.3f} "
            f"{n['runtime_overhead_bytes'] / 1e6:>7.0f} "
            f"{n['target_bytes'] / 1e6:>8.0f}{'' if n['within_target'] else '!'} "
            f"{n['model_dir_bytes'] / 1e6:>7.1f}"
        )
    print(f"target: idle + {RUNTIME_MB} MiB runtime + 1.15 x weights ('!': over it)")
    print(
        f"decode {result['decode_tok_per_s']} tok/s over {result['tokens']} tokens (ttft {result['ttft_s']} s); "
        f"deploy {result['deploy_s']} s (manifest {result['manifest_s']} s)"
    )
    if ref:
        print(
            f"llama.cpp (llama-bench, 1 thread, whole file): {ref:.2f} tok/s -> cluster/llama.cpp = {result['vs_llama_cpp']}"
        )
    if result["kill"]:
        k = result["kill"]
        print(
            f"kill-to-next-token {k['kill_to_next_token_s']} s (node 2 killed; the spare got "
            f"{(k['spare_shipped_bytes'] or 0) / 1e6:.1f} MB shipped in {k['spare_ship_s']} s)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
