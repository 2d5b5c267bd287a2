"""How long the `edgeshard` command takes to start: `--version`, `--help`, and a command's own `--help`.

    python benchmarks/cli_start.py [--runs 5]

Each line is a fresh process (`python -m edgeshard.coordinator.cli.main ...`), timed wall-clock; the table shows
the median of `--runs`. `edgeshard --help` imports no part of the library (the command table is data), and a
command's `--help` imports what its flags need but not torch, the planner or mDNS (cli/options.py). Writes
benchmarks/results/cli_start.json. On a shared machine the figures move with the load: compare ratios from
one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = (
    ("--version",),
    ("--help",),
    ("run", "--help"),
    ("serve", "--help"),
    ("plan", "--help"),
    ("node", "--help"),
)
# the floor: a Python that imports nothing of ours; and what the old CLI imported at start (torch)
BASELINES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    cmds = {name: cmd for name, cmd in BASELINES.items()}
    for case in CASES:
        cmds["edgeshard " + " ".join(case)] = [sys.executable, "-m", "edgeshard.coordinator.cli.main", *case]
    for name, cmd in cmds.items():
        times = [time_once(cmd) for _ in range(args.runs)]
        rows.append({"command": name, "median_s": round(statistics.median(times), 3), "runs": args.runs})
        print(f"{name:<28} {statistics.median(times):7.3f} s", flush=True)
    out = Path(__file__).parent / "results" / "cli_start.json"
    out.write_text(
        json.dumps(
            {"machine": platform.machine(), "python": platform.python_version(), "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
