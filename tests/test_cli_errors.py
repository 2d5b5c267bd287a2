"""The first hour's mistakes, each through the real `edgeshard` command: one `edgeshard: error:` line with the
right hint, exit code 2 for usage and 1 for failures, no traceback (unless --debug), before any slow work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeshard.node.security.cluster_key import ClusterKey

CLI = [sys.executable, "-m", "edgeshard.coordinator.cli.main"]
# a documentation address (RFC 5737 TEST-NET-3): never one of this machine's
FOREIGN = "203.0.113.5"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGESHARD_DEBUG", "GRPC_VERBOSITY")}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
    )


def _one_error_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The error line of `r`: it exits `code`, its stderr ends in exactly one `edgeshard: error:` line with
    every needle, and holds no traceback and none of gRPC's own log lines."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("edgeshard: error: "), r.stderr
    assert sum(line.startswith("edgeshard: error:") for line in lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "add_port.cc" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- usage: exit code 2 -----------------------------------------------------------------------------------------
def test_a_missing_flag_is_one_usage_line():
    _one_error_line(_cli("run", "--prompt", "hi"), 2, "--model", "edgeshard run --help")


def test_an_unknown_command_is_one_usage_line():
    _one_error_line(_cli("rn"), 2, "invalid choice")


def _loaded_after(argv: list[str], modules: tuple[str, ...]) -> tuple[list[str], str]:
    """Which of `modules` `edgeshard ARGV` (a --help) imported, and what it printed."""
    probe = (
        "import sys\n"
        "from edgeshard.coordinator.cli.main import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('LOADED', sorted(m for m in {modules!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    loaded = out.stdout.rsplit("LOADED ", 1)[-1].strip()
    return json.loads(loaded.replace("'", '"')), out.stdout


def test_version_and_help_start_without_the_heavy_libraries():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgeshard ") and r.stdout.split()[1][0].isdigit()
    loaded, text = _loaded_after(["--help"], ("torch", "grpc", "zeroconf", "fastapi", "numpy"))
    assert loaded == [], loaded
    for command in ("run", "node", "serve", "cluster", "plan", "nodes", "chat", "secret", "doctor"):
        assert command in text
    # a command's own --help builds its flags but loads neither torch nor the planner nor mDNS
    loaded, text = _loaded_after(["run", "--help"], ("torch", "zeroconf", "fastapi", "numpy"))
    assert loaded == [] and "--raw" in text and "--take-over" in text, (loaded, text)


def test_a_bad_choice_is_a_usage_line_naming_the_choices():
    _one_error_line(_cli("plan", "--model", "m", "--quant", "int3"), 2, "int3", "f32, bf16, int8, int4")
    _one_error_line(_cli("plan", "--model", "m", "--objective", "fast"), 2, "latency, throughput")


def test_a_foreign_mdns_interface_is_refused_before_anything_starts():
    for args in (
        ("node", "--insecure", "--port", "0", "--no-benchmark"),
        ("nodes", "--timeout", "0.1"),
    ):
        r = _cli(*args, "--mdns-interface", FOREIGN)
        line = _one_error_line(r, 2, FOREIGN, "not an address of this machine")
        assert "127.0.0.1" in line  # the addresses it could have used
        assert "EDGESHARD_NODE_READY" not in r.stdout


def test_a_prompt_longer_than_the_context_is_refused_before_loading(smollm2_path):
    prompt = "the sky is blue " * 2300  # ~9,200 tokens; SmolLM2 holds 8,192
    r = _cli("run", "--local", "--model", str(smollm2_path), "--prompt", prompt, "--max-tokens", "8")
    _one_error_line(r, 2, "context holds 8192", "shorten the prompt")
    assert "load_s" not in r.stdout


# ---- failures: exit code 1 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_directory_without_a_model_or_a_file_that_is_not_one(command, tmp_path, smollm2_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.gguf").write_text("not a model\n")
    where = ["--local", "--prompt", "hi"] if command == "run" else ["--peers", "127.0.0.1:1", "--insecure"]
    r = _cli(command, "--model", str(tmp_path / "empty"), *where)
    _one_error_line(r, 1, "directory without config.json", "accepted:")
    r = _cli(command, "--model", str(tmp_path / "notes.gguf"), *where)
    _one_error_line(r, 1, "not a GGUF checkpoint", "accepted:")


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("run", "--local", "--model", str(tmp_path / "empty"), "--prompt", "hi", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ModelRefError" in r.stderr


def test_models_list_json_is_json(smollm2_path):
    r = _cli("models", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    demo = next(row for row in rows if row["name"] == "smollm2-135m")
    assert demo["pulled"] and Path(demo["path"]) == Path(smollm2_path)


def test_a_taken_port_and_a_wrong_host_say_which():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        r = _cli(
            "node", "--insecure", "--host", "127.0.0.1", "--port", port, "--no-advertise", "--no-benchmark"
        )
        _one_error_line(r, 1, f"port {port}", "in use", "--port 0")
    r = _cli("node", "--insecure", "--host", FOREIGN, "--port", "0", "--no-advertise", "--no-benchmark")
    _one_error_line(r, 1, f"--host {FOREIGN} is not an address of this machine")
    r = _cli("node", "--insecure", "--host", "999.1.1.1", "--port", "0", "--no-advertise", "--no-benchmark")
    _one_error_line(r, 1, "--host '999.1.1.1'")


@pytest.fixture(scope="module")
def keyed_node(smollm2_path, tmp_path_factory):
    """One node holding a cluster key of its own (no benchmark: these tests never plan)."""
    from edgeshard.coordinator.sdk.local_nodes import LocalNodes

    key = ClusterKey.generate()
    with LocalNodes(
        1, model_dir=Path(smollm2_path).parent, security=key, name="keyed", node_args=["--no-benchmark"]
    ) as nodes:
        yield nodes


def test_insecure_or_another_key_against_a_keyed_node_says_not_a_member(keyed_node, smollm2_path, tmp_path):
    address = keyed_node.addresses[0]
    run = ["run", "--peers", address, "--model", str(smollm2_path), "--prompt", "hi", "--max-tokens", "2"]
    for who in (
        ["--insecure"],
        ["--cluster-key-file", str(ClusterKey.generate().save(tmp_path / "other.key"))],
    ):
        line = _one_error_line(_cli(*run, *who, timeout=120), 1, address, "not a member")
        assert "not reachable" not in line and "start it there" not in line


def test_an_unreachable_node_is_still_called_unreachable(smollm2_path, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    key = str(ClusterKey.generate().save(tmp_path / "k"))
    r = _cli(
        "run", "--peers", address, "--model", str(smollm2_path), "--prompt", "hi", "--cluster-key-file", key
    )
    _one_error_line(r, 1, address, "not reachable")
