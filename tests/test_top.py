"""`edgeshard top`: rates over an interval from two /v1/cluster reads, and the command against a real server."""

from __future__ import annotations

import socket

import pytest

from edgeshard.coordinator.cli.main import main
from edgeshard.coordinator.cli.top import rates


def test_rates_are_differences_over_the_interval():
    prev = {"steps": 10, "compute_ms": 500.0, "network_ms": 40.0, "wall_ms": 10_000.0, "utilization": 0.05}
    now = {"steps": 30, "compute_ms": 900.0, "network_ms": 100.0, "wall_ms": 11_000.0, "utilization": 0.08}
    assert rates(now, prev) == {"busy": pytest.approx(0.4), "compute": 20.0, "network": 3.0}
    # no previous read: the averages since loading, as the server computed them
    now["compute_ms_per_step"], now["network_ms_per_step"] = 30.0, 3.3
    assert rates(now, None) == {"busy": 0.08, "compute": 30.0, "network": 3.3}
    # no new step: busy falls to what the interval says (0), the last per-step figures stay
    idle = {**now, "wall_ms": 12_000.0}
    assert rates(idle, now) == {"busy": 0.0, "compute": 30.0, "network": 3.3}


def test_top_once_against_a_server(api_server, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["top", "--url", api_server.url, "--once", "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert api_server.served.engine.model_name in out
    assert "local" in out and "0–29" in out and "tok/s" in out


def test_top_unreachable_is_one_line(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["top", "--url", f"http://127.0.0.1:{port}", "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeshard: error: cannot reach")
