"""Every `edgeshard ...` example in README.md and docs/*.md works as written.

Each example line is parsed by the real command-line parser (a flag that does not exist, or a value it
refuses, fails here at once). Those that can run on one machine (`--local`, `cluster`, `models`, `secret`)
run as written (slow); `serve --local` and `chat` run against each other on a free port instead of 8000.
The others need boards (`--peers a:50051,...`, mDNS on a LAN, a node per board): each must be named in
`COVERED` with the test that runs the same command against local processes, and that test must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeshard.coordinator.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
# docs/CLI.md's block is the synopsis (placeholders, [optional] flags): its flags are the parsers' own
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "CLI.md")]
CLI = [sys.executable, "-m", "edgeshard.coordinator.cli.main"]

# (command, a flag that tells the example apart or ""): the test running that command for real, as
# "file::function". Checked: the function must exist in the file.
COVERED = {
    ("node", ""): "tests/test_cli_errors.py::keyed_node",  # LocalNodes: every node test starts `node`
    (
        "nodes",
        "",
    ): "tests/test_plan_trust.py::test_plan_over_nodes_started_together_uses_all_and_predicts_the_speed",
    (
        "plan",
        "",
    ): "tests/test_plan_trust.py::test_plan_over_nodes_started_together_uses_all_and_predicts_the_speed",
    ("doctor", ""): "tests/test_discovery.py::test_duplicate_node_ids_are_reported",
    (
        "run",
        "--discover",
    ): "tests/test_plan_trust.py::test_plan_over_nodes_started_together_uses_all_and_predicts_the_speed",
    ("run", "--peers"): "tests/test_pipeline.py::test_cli_run_peers_matches_local",
    (
        "serve",
        "--peers",
    ): "tests/test_ownership.py::test_a_second_coordinator_is_refused_and_the_first_keeps_answering",
    (
        "serve",
        "--discover",
    ): "tests/test_recovery_cli.py::test_serve_discover_replans_over_the_nodes_mdns_knows",
    (
        "cluster",
        "--http",
    ): "tests/test_serve_cluster.py::test_cluster_command_serves_http_and_stops_on_sigint",
    ("secret", "id"): "tests/test_doc_examples.py::test_examples_that_run_here_run_as_written",
    # talks to nodes (its --peers name boards): run by the three-node revocation test
    (
        "secret",
        "revoke",
    ): "tests/test_security_credentials.py::test_three_enrolled_nodes_revoke_one_and_the_rest_keep_serving",
    ("top", ""): "tests/test_top.py::test_top_once_against_a_server",
}
RUN_HERE = ("--local", "models", "secret", "--help", "--version")  # run as written (cluster: see below)


def examples() -> list[tuple[str, list[str]]]:
    """(where, argv after `edgeshard`) of every example line in a ``` block of the docs (not synopses)."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        # shell blocks only (```text blocks show output)
        for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
            for line in joined.splitlines():
                line = line.strip()
                if not line.startswith("edgeshard "):
                    continue
                argv = shlex.split(line, comments=True)[1:]
                if any("[" in a or re.fullmatch(r"NAME|FILE|M|N|H:P", a) for a in argv):
                    continue  # a synopsis, not an example
                found.append((f"{doc.name}: {line[:80]}", argv))
    return found


def _key(argv: list[str]) -> tuple[str, str]:
    command = argv[0]
    for flag in ("revoke", "--discover", "--peers", "--local", "--http", "id"):
        if flag in argv:
            return command, flag
    return command, ""


def _talks_to_nodes(argv: list[str]) -> bool:
    """`secret revoke ... --peers` pushes to boards the example names: covered, never run here."""
    return argv[:2] == ["secret", "revoke"]


def test_every_example_parses_and_is_run_or_covered():
    found = examples()
    assert len(found) >= 15, found  # the README and docs have many: extraction works
    for where, argv in found:
        parser = build_parser(argv[0])
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            if e.code != 0:  # --help exits 0
                raise AssertionError(f"{where}: does not parse") from None
        if not _talks_to_nodes(argv) and (
            any(word in argv for word in RUN_HERE)
            or argv[0] in RUN_HERE
            or (argv[0] == "cluster" and "--prompt" in argv)
        ):
            continue  # run by the test below
        if argv[0] in ("chat",) or (argv[0] == "serve" and "--local" in argv):
            continue  # run by test_serve_local_and_chat_as_documented
        covered = COVERED.get(_key(argv)) or COVERED.get((argv[0], ""))
        assert covered, f"{where}: neither run here nor covered; add it to COVERED with the test that runs it"
        file, _, func = covered.partition("::")
        assert re.search(rf"def {func}\b", (ROOT / file).read_text()), f"{where}: {covered} does not exist"


@pytest.mark.slow
def test_examples_that_run_here_run_as_written(tmp_path):
    """`models`, `secret`, `run --local` and `cluster --prompt` from the docs, verbatim, in a scratch directory
    (`secret new --out cluster.key` writes there; the later examples read that key)."""
    ran = 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("EDGESHARD_CLUSTER_KEY", None)
    seen = set()
    ordered = sorted(
        examples(), key=lambda e: (e[1][0] != "secret" or "new" not in e[1], e[1][0] != "secret")
    )
    for where, argv in ordered:
        here = (
            argv[0] in RUN_HERE
            or any(w in argv for w in RUN_HERE)
            or (argv[0] == "cluster" and "--prompt" in argv)
        )
        if not here or argv[0] in ("serve", "node") or _talks_to_nodes(argv) or tuple(argv) in seen:
            continue
        seen.add(tuple(argv))
        # a key file a guide puts in a system place (/etc/edgeshard/cluster.key on a Pi): the scratch dir's
        argv = [
            str(tmp_path / Path(a).name) if i and argv[i - 1] in ("--out", "--cluster-key-file") and a.startswith("/") else a
            for i, a in enumerate(argv)
        ]  # fmt: skip
        r = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert r.returncode == 0, f"{where}\n{r.stderr[-2000:]}"
        if argv[0] in ("run", "cluster"):  # an answer, not an empty line (the chat template is the default)
            assert len(r.stdout.strip().splitlines()[0]) > 10, f"{where}: {r.stdout!r}"
        ran += 1
    assert ran >= 4


@pytest.mark.slow
def test_serve_local_and_chat_as_documented(smollm2_path):
    """`serve --model smollm2-135m --local` (on a free port: 8000 may be taken) and `chat --url` against it;
    chat's slash commands stay in the terminal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    serve = subprocess.Popen(
        [*CLI, "serve", "--model", "smollm2-135m", "--local", "--threads", "1", "--http", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url, deadline = None, time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = serve.stderr.readline()
            assert line or serve.poll() is None, "serve exited before serving"
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        assert url
        chat = subprocess.run(
            [*CLI, "chat", "--url", url, "--max-tokens", "8", "--temperature", "0"],
            input="/help\nName a color.\n/exit\n",
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert chat.returncode == 0, chat.stderr
        assert "commands: /help" in chat.stdout and len(chat.stdout.splitlines()) >= 3, chat.stdout
    finally:
        serve.terminate()
        serve.wait(30)
