"""The start-up microbenchmark, its estimates, and how a node reports it (GetInfo, TXT, identity)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from edgeshard.node.lowbit.factory import lowbit_classes
from edgeshard.node.model.config import ModelConfig
from edgeshard.node.model.cost import ModelCost
from edgeshard.node.presence.advertise import Advert, instance_name
from edgeshard.node.presence.capability import Capability, fill_wire, format_bytes, from_wire, parse_size
from edgeshard.node.presence.identity import claim_identity
from edgeshard.node.presence.microbench import measure
from edgeshard.node.wire import edgeshard_pb2 as pb


@pytest.fixture(scope="module")
def cap() -> Capability:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    c = measure(threads=1, jitter_s=0, quiet_wait_s=0)  # the benchmark itself (no waiting for other nodes)
    c = dataclasses.replace(c, bench_ms=(time.perf_counter() - t0) * 1e3)
    return c


def test_benchmark_measures_every_figure(cap):
    # no bound on its duration here (timings belong in benchmarks/; on a shared CI machine the 0.4 s budget
    # takes several seconds of wall time): bench_ms is reported, and must be a real measurement
    assert cap.bench_ms > 0, cap
    assert cap.threads == 1 and cap.cores >= 1 and cap.memory_total > 0
    for name in ("mem_gbps", "int4_gbps", "int8_gbps", "bf16_gbps", "f32_gbps", "layer_overhead_ms"):
        assert getattr(cap, name) > 0, name
    assert cap.measured


def test_estimates_grow_with_the_work(cap):
    small = ModelCost.of(
        ModelConfig(
            vocab_size=1000,
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=512,
        ),
        "int4",
    )
    big = ModelCost.of(
        ModelConfig(
            vocab_size=1000,
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=2816,
        ),
        "int4",
    )
    assert cap.layer_ms(big) > cap.layer_ms(small) > cap.layer_overhead_ms
    assert cap.stage_ms(small, 0, 8) > cap.stage_ms(small, 2, 6)  # more layers, embedding and head
    assert cap.layer_ms(small, position=4000) > cap.layer_ms(small, position=10)  # attention reads the cache


def test_predicted_layer_time_is_close_to_a_real_layer(cap):
    """A decoder layer at a mid-size shape: the estimate is within a factor of 10 of the measured time.

    This catches a wrong unit or a model that misses a term (both are off by far more than 10x); accuracy
    is a timing target and belongs in benchmarks/planner.py (20% on whole pipelines). The factor was 3, which
    a shared CI machine under load sometimes broke: the microbenchmark and this measurement run seconds apart."""
    from edgeshard.node.model.config import ShardSpec
    from edgeshard.node.model.decoder import Segment, Stage
    from edgeshard.node.presence.microbench import _median_ms

    cfg = ModelConfig(
        vocab_size=1000,
        hidden_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2816,
        max_position_embeddings=512,
    )
    stage = Stage(cfg, ShardSpec(1, 5, 6), dtype=torch.bfloat16)
    for name, mod in list(stage.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            int4 = lowbit_classes(mod.in_features)[
                0
            ]  # the class a node builds here (native or torch kernels)
            setattr(stage.get_submodule(parent), leaf, int4.from_float(mod.weight.detach()))
    cache = stage.new_cache(512)
    stage(torch.randn(64, 1024).to(torch.bfloat16), [Segment(cache, 0, 64)])
    x = torch.randn(1, 1024).to(torch.bfloat16)
    measured = _median_ms(lambda: stage(x, [Segment(cache, 64, 1)]), 0.3) / 4
    predicted = cap.layer_ms(ModelCost.of(cfg, "int4"))
    assert measured / 10 < predicted < measured * 10, (predicted, measured)


def test_capability_travels_in_get_info():
    cap = Capability(
        cores=4,
        threads=2,
        memory_limit=1 << 30,
        mem_gbps=5.0,
        int4_gbps=3.0,
        int8_gbps=2.5,
        bf16_gbps=2.0,
        f32_gbps=1.5,
        layer_overhead_ms=0.2,
        step_overhead_ms=0.05,
        bench_ms=400,
    )
    caps = pb.Capabilities(
        cores=4, torch_threads=2, memory_total=8 << 30, memory_free=6 << 30, arch="aarch64"
    )
    fill_wire(cap, caps)
    back = from_wire(pb.Capabilities.FromString(caps.SerializeToString()))
    assert back == dataclasses.replace(cap, memory_total=8 << 30, memory_free=6 << 30, arch="aarch64")
    assert not from_wire(pb.Capabilities(cores=2)).measured  # an older node: no benchmark


def test_sizes():
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == 3 << 29 and parse_size("2GiB") == 2 << 30
    assert parse_size("300MB") == 300_000_000 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="512M"):
        parse_size("lots")
    assert format_bytes(3 << 29) == "1.5 GiB"


def test_txt_record_round_trip():
    adv = Advert(
        node_id="ab" * 16,
        name="pi-kitchen",
        port=50051,
        addresses=("192.0.2.7",),
        protocol=1,
        cluster="lab",
        memory_free=700 << 20,
        memory_total=1 << 30,
        cores=4,
        threads=4,
        arch="aarch64",
        int4_gbps=1.25,
        layer_overhead_ms=0.4,
        loaded="0-10/30",
        version="0.1.0",
    )
    txt = {k.encode(): v.encode() for k, v in adv.to_txt().items()}  # as zeroconf hands them over
    assert all(len(k) + len(v) < 255 for k, v in txt.items())
    back = Advert.from_txt(txt, 50051, ["192.0.2.7"])
    assert back == adv
    assert not adv.differs_from(dataclasses.replace(adv, memory_free=(700 << 20) - (1 << 20)))
    assert adv.differs_from(dataclasses.replace(adv, memory_free=300 << 20))
    assert adv.differs_from(dataclasses.replace(adv, loaded=""))
    assert Advert.from_txt({b"id": b"x", b"v": b"oops"}, 1, []).protocol == 0  # garbage is not fatal
    assert instance_name("pi.kitchen", "ab" * 16) == "pi-kitchen-abababab._edgeshard._tcp.local."


def test_node_id_is_kept_and_claimed_by_one_process(tmp_path):
    first = claim_identity(tmp_path / "state")
    assert first.lasting and (tmp_path / "state" / "node_id").read_text().strip() == first.node_id
    second = claim_identity(tmp_path / "state")  # the lock is held: a temporary id
    assert not second.lasting and second.node_id != first.node_id
    first.release()
    again = claim_identity(tmp_path / "state")
    assert again.lasting and again.node_id == first.node_id
    again.release()


def test_monitor_reports_the_median_of_recent_runs():
    from edgeshard.node.presence.monitor import CapabilityMonitor

    runs = [
        Capability(int4_gbps=g, mem_gbps=10.0, layer_overhead_ms=0.1) for g in (1.0, 9.0, 2.0, 3.0, 50.0, 4.0)
    ]
    monitor = CapabilityMonitor(runs[0], every_s=1, keep=5)
    for cap in runs[1:]:
        monitor.add(cap)
    assert monitor.current.int4_gbps == 4.0  # median of the last five: 9, 2, 3, 50, 4


def test_nodes_on_one_machine_take_turns_to_benchmark(tmp_path):
    """The machine-wide lock: a second benchmark waits for the first (and gives up waiting only at its
    deadline), so nodes started together never time their kernels against each other's."""
    import threading

    from edgeshard.node.presence.microbench import bench_lock

    lock = tmp_path / "bench.lock"
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with bench_lock(lock) as taken:
            assert taken
            held.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert held.wait(10)
    t0 = time.perf_counter()
    with bench_lock(lock, wait_s=0.3) as taken:  # the first still holds it: not taken, after the wait
        assert not taken and time.perf_counter() - t0 >= 0.3
    release.set()
    t.join()
    with bench_lock(lock, wait_s=0.3) as taken:
        assert taken
