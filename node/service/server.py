"""The node's gRPC server: a thin servicer over `RingNode` (node/service/ring.py) and `load_shard`.

    python -m edgeshard.node.service.server --port 0     # or `edgeshard node`

Once listening, the node prints one machine-readable line on stdout, `EDGESHARD_NODE_READY port=<p> name=<n>`,
so a parent that started it with `--port 0` learns the port. SIGTERM and SIGINT stop it cleanly: the server
stops with a grace period (open streams end), the stream to the next hop is closed, the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import os
import platform
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgeshard.node.lowbit import native
from edgeshard.node.presence.advertise import package_version, start_advertising
from edgeshard.node.presence.capability import Capability, fill_wire, parse_size
from edgeshard.node.presence.identity import claim_identity, default_state_dir
from edgeshard.node.presence.microbench import measure
from edgeshard.node.presence.monitor import start_remeasuring
from edgeshard.node.security.channels import (
    INSECURE,
    INSECURE_WARNING,
    Insecure,
    NodeCredentials,
    Security,
    listen,
    revocations,
    security_from_args,
    server_interceptors,
    use_revocation_file,
)
from edgeshard.node.security.credentials import CallSigner, RevocationStore, signer_for
from edgeshard.node.service.next_hop import coalesce, drain, now_us
from edgeshard.node.service.node_args import MAX_BATCH_ROWS, SESSION_IDLE_S, add_node_args
from edgeshard.node.service.ownership import Ownership, caller_id
from edgeshard.node.service.recover import recover
from edgeshard.node.service.ring import RingNode
from edgeshard.node.service.shard_load import load_shard
from edgeshard.node.service.slices import pull_slice, read_slice, ship_slice, slice_manifest_of, slice_status
from edgeshard.node.weights.cache import SliceCache
from edgeshard.node.wire import PROTOCOL_VERSION
from edgeshard.node.wire import edgeshard_pb2 as pb
from edgeshard.node.wire import edgeshard_pb2_grpc as pb_grpc
from edgeshard.node.wire.limits import SERVER_OPTIONS, check_subscriber
from edgeshard.node.wire.options import GRPC_OPTIONS, SERVER_KEEPALIVE_OPTIONS
from edgeshard.node.wire.tensors import WireError

log = logging.getLogger("edgeshard.node")

READY_PREFIX = "EDGESHARD_NODE_READY"
PARENT_PID_ENV = "EDGESHARD_PARENT_PID"  # set by `cluster`: the node exits when that process is gone
STOP_GRACE_S = 2.0
MAX_HEALTH_PAYLOAD = 4 << 20  # largest link-test reply a node sends
MAX_REVOCATION_BYTES = 2 << 20  # largest revocation list a node takes (10,000 names fit)


@dataclass
class NodeOptions:
    """How a node runs (the `edgeshard node` flags)."""

    host: str = "0.0.0.0"  # address to listen on
    port: int = 0  # 0 picks a free port (reported on the READY line)
    # shown in plans and tables; "" (the default): `hostname:port`, so several nodes on one machine differ
    name: str = ""
    threads: int | None = None  # torch threads (None: torch's default, all cores)
    model_dir: Path | None = None  # the only directory model files are opened from (None: the model cache)
    state_dir: Path | None = None  # node identity (and, later, keys and the capability benchmark)
    max_sessions: int = 64  # sessions (KV caches) held at once
    kv_budget: int = 0  # bytes KV caches may reserve (0: what memory_limit leaves, else half what is free)
    session_idle_s: float = SESSION_IDLE_S  # sessions nobody steps for this long are ended (0: never)
    max_batch_rows: int = MAX_BATCH_ROWS  # rows one batched forward takes at most
    compute: str = "thread"  # where the stage computes: "thread" (one worker) or "inline" (the event loop)
    advertise: bool = False  # announce the node on mDNS (node/presence/advertise.py)
    mdns_interfaces: list[str] = field(default_factory=list)  # IPv4 addresses mDNS runs on (empty: all)
    cluster: str = "default"  # cluster name it announces; coordinators of other clusters skip the node
    memory_limit: int = 0  # bytes of shards + KV the planner may put here (0: whatever is free)
    cache_limit: int = (
        0  # bytes the slice cache (shipped tensors, node/weights/cache.py) may hold (0: no limit)
    )
    benchmark: bool = True  # run the capability microbenchmark at start (node/presence/capability.py)
    benchmark_every: float = 300.0  # and again every this many seconds while idle (0: only at start)
    # the cluster key (TLS + per-call tokens, node/security/channels.py), or INSECURE; None refuses to start
    security: Security | None = None


@functools.cache
def _kernels() -> str:
    """The low-bit kernels this process runs (asked once: finding out may build them)."""
    return native.status()


def capabilities(measured: Capability | None = None) -> pb.Capabilities:
    """What this machine offers, as GetInfo reports it (with the start-up benchmark when `measured`)."""
    import psutil
    import torch

    from edgeshard.node.lowbit.formats import QUANT_FORMATS

    mem = psutil.virtual_memory()
    caps = pb.Capabilities(
        cores=os.cpu_count() or 1,
        memory_total=mem.total,
        memory_free=mem.available,
        arch=platform.machine(),
        torch_threads=torch.get_num_threads(),
        platform=f"{platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        quant_formats=list(QUANT_FORMATS),
        kernels=_kernels(),
    )
    if measured is not None:
        fill_wire(measured, caps)
    return caps


class NodeServicer(pb_grpc.NodeServicer):
    """The gRPC face of a node; every method is a few lines over RingNode / load_shard."""

    def __init__(self, node: RingNode, options: NodeOptions, node_id: str, address: str = "") -> None:
        self.node = node
        self.options = options
        self.node_id = node_id
        self.address = address
        self.model_dir = options.model_dir or _default_model_dir()
        self.slices = SliceCache(self.model_dir, options.cache_limit)  # shipped tensors (weight shipping)
        self.load_lock = asyncio.Lock()
        self.capability = Capability()  # set by serve() from the start-up benchmark
        self.streams: set[asyncio.Queue] = set()  # reply/result queues of open streams, ended on shutdown
        self.ownership = Ownership()  # which coordinator's plan this node serves (node/service/ownership.py)
        # per-node credentials (#20), set by serve(): this member's key (answers GetInfo challenges) and
        # the revocation list it enforces
        self.signer: CallSigner | None = None
        self.revocations: RevocationStore | None = None

    def end_streams(self) -> None:
        """Finish every open Forward and Results stream with OK, so shutdown does not have to cancel them."""
        for queue in list(self.streams):
            queue.put_nowait(None)

    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.NodeInfo:  # noqa: N802
        shard = self.node.shard
        self.ownership.touch(caller_id(context))  # a holder's GetInfo is a sign of life
        info = pb.NodeInfo(
            node_id=self.node_id,
            name=self.node.name,
            protocol_version=PROTOCOL_VERSION,
            capabilities=capabilities(self.capability),
            loaded=shard is not None,
            shard=shard.info() if shard else None,
            max_sessions=self.node.max_sessions,
            stats=self.node.stats(),
            address=self.address,
            cluster=self.options.cluster,
            clock_unix_s=time.time(),
            version=package_version(),
        )
        if shard is not None:
            self.ownership.fill(info.shard)
        self._creds_info(request, info)
        return info

    # ---- per-node credentials (#20) ----------------------------------------------------------------------
    def _creds_info(self, request: pb.GetInfoRequest, info: pb.NodeInfo) -> None:
        """GetInfo's credential part: the revocation list's number, and (when asked) this node's certificate
        with its signature over the caller's challenge (members/confirm refuses a revoked node by it)."""
        store = self.revocations
        info.creds_revocation_seq = store.current.seq if store is not None else 0
        if self.signer is not None and 0 < len(request.creds_challenge) <= 64:
            info.creds_certificate = self.signer.cert_der
            info.creds_signature = self.signer.sign_challenge(request.creds_challenge)

    async def PushRevocations(  # noqa: N802
        self, request: pb.CredsRevocations, context
    ) -> pb.CredsRevocationsReply:
        store = self.revocations
        if store is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "an --insecure node keeps no revocation list"
            )
        if len(request.signed_list) > MAX_REVOCATION_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "revocation list larger than 2 MiB")
        taken, why = store.offer(request.signed_list)
        return pb.CredsRevocationsReply(accepted=taken, seq=store.current.seq, reason=why)

    async def LoadShard(self, request: pb.LoadShardRequest, context):  # noqa: N802
        async with self.load_lock:  # one load at a time; a second waits and then replaces the first
            refusal = self.ownership.refusal(request, self.node.name, self.address)
            if refusal is not None:  # another coordinator's plan runs here: nothing is touched
                log.warning("LoadShard refused: %s", refusal)
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
            old_plan = self.node.shard.plan_id if self.node.shard is not None else 0
            try:
                async for progress in load_shard(self.node, request, self.model_dir, slices=self.slices):
                    if progress.done:
                        self.ownership.loaded(request, self.node.name, old_plan)
                        self.ownership.fill(progress.shard)
                    yield progress
            except WireError as e:
                log.warning("LoadShard %r refused: %s", request.model, e.message)
                await context.abort(e.code, e.message)

    async def SliceStatus(self, request: pb.SliceStatusRequest, context) -> pb.SliceStatusReply:  # noqa: N802
        try:
            return await slice_status(self.slices, request, self.model_dir)
        except WireError as e:
            await context.abort(e.code, e.message)

    async def ShipSlice(self, request_iterator, context) -> pb.ShipSliceReply:  # noqa: N802
        try:
            return await ship_slice(self.slices, request_iterator)
        except WireError as e:
            log.warning("ShipSlice refused: %s", e.message)
            await context.abort(e.code, e.message)

    async def ReadSlice(self, request: pb.ReadSliceRequest, context):  # noqa: N802
        try:
            async for chunk in read_slice(self.slices, request, self.model_dir):
                yield chunk
        except WireError as e:
            log.warning("ReadSlice refused: %s", e.message)
            await context.abort(e.code, e.message)

    async def PullSlice(self, request: pb.PullSliceRequest, context):  # noqa: N802
        try:
            async for progress in pull_slice(self.slices, request):
                yield progress
        except WireError as e:
            log.warning("PullSlice from %s failed: %s", request.source, e.message)
            await context.abort(e.code, e.message)

    async def SliceManifestOf(self, request: pb.SliceManifestOfRequest, context) -> pb.SliceManifest:  # noqa: N802
        try:
            return await slice_manifest_of(self.slices, request, self.model_dir)
        except WireError as e:
            await context.abort(e.code, e.message)

    async def ReleasePlan(self, request: pb.ReleasePlanRequest, context) -> pb.ReleasePlanReply:  # noqa: N802
        shard = self.node.shard
        if shard is None or shard.plan_id != request.plan_id:  # a newer plan (recovery) holds the node now
            return pb.ReleasePlanReply(released=False)
        return pb.ReleasePlanReply(released=self.ownership.release(request.coordinator_id))

    async def Forward(self, request_iterator, context):  # noqa: N802
        replies: asyncio.Queue = asyncio.Queue()
        self.streams.add(replies)
        coordinator = caller_id(context)  # "" for the previous node's stream
        self.ownership.opened(coordinator, replies)

        async def pump() -> None:
            try:
                async for msg in request_iterator:
                    if self.node.shard is not None and msg.plan_id == self.node.shard.plan_id:
                        self.ownership.touch()  # the holder's plan is in use
                    await self.node.handle(msg, replies.put_nowait)
            finally:
                replies.put_nowait(None)

        task = asyncio.create_task(pump())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            if task.done():
                await task  # surfaces an exception of the pump as the stream's status
        finally:
            self.streams.discard(replies)
            self.ownership.closed(coordinator, replies)
            task.cancel()
            # its sessions end here and down the ring; a node's stream (the node before died or moved on to
            # a new plan): they wait a while for a recovery to resume them (node/service/recover.py)
            self.node.stream_closed(replies.put_nowait, from_node=not coordinator)

    async def Recover(self, request_iterator, context) -> pb.RecoverReply:  # noqa: N802
        """Resume a session on a new plan after a failure (recovery, node/service/recover.py)."""
        try:
            return await recover(self.node, request_iterator)
        except WireError as e:
            log.info("Recover refused: %s", e.message)
            await context.abort(e.code, e.message)

    async def Results(self, request: pb.ResultsRequest, context):  # noqa: N802
        subscriber = request.subscriber or uuid.uuid4().hex
        try:  # a replaced subscription (same name) does not count against the limit
            check_subscriber(subscriber, len(self.node.subscribers) - (subscriber in self.node.subscribers))
        except WireError as e:
            await context.abort(e.code, e.message)
        queue = self.node.subscribe(subscriber)
        self.streams.add(queue)
        coordinator = caller_id(context)
        self.ownership.opened(coordinator)
        try:
            yield pb.Result(kind=pb.RESULT_READY, plan_id=self.node.shard.plan_id if self.node.shard else 0)
            while True:  # what queued up meanwhile (a batched forward's results) goes as one message
                results = drain(queue, await queue.get())
                end = next((i for i, r in enumerate(results) if r is None), None)  # None: unsubscribed
                for result in coalesce(results[:end], pb.Result, now_us()):
                    yield result
                if end is not None:
                    break
        finally:
            self.streams.discard(queue)
            self.ownership.closed(coordinator)
            self.node.unsubscribe(subscriber, queue)

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:  # noqa: N802
        shard = self.node.shard
        payload = bytes(
            min(request.reply_bytes, MAX_HEALTH_PAYLOAD)
        )  # link test (coordinator/placement/links.py)
        return pb.HealthReply(
            ok=True, loaded=shard is not None, plan_id=shard.plan_id if shard else 0, payload=payload
        )


def _default_model_dir() -> Path:
    from edgeshard.node.weights.model_dir import default_model_dir

    return default_model_dir()


async def serve(options: NodeOptions, ready_out=sys.stdout) -> None:
    """Run a node until SIGTERM/SIGINT (or until the parent named by EDGESHARD_PARENT_PID is gone)."""
    import torch

    if options.threads:
        torch.set_num_threads(options.threads)
    security = _security(options)
    identity = claim_identity(options.state_dir)
    named = bool(options.name)
    options.name = options.name or default_name(options.port)
    node = RingNode(
        options.name,
        max_sessions=options.max_sessions,
        kv_budget=options.kv_budget,
        memory_limit=options.memory_limit,
        max_batch_rows=options.max_batch_rows,
        compute=options.compute,
        session_idle_s=options.session_idle_s,
    )
    server = grpc.aio.server(
        options=GRPC_OPTIONS + SERVER_KEEPALIVE_OPTIONS + SERVER_OPTIONS + [("grpc.so_reuseport", 0)],
        interceptors=server_interceptors(security, options.name),  # the membership check, before handlers
    )
    servicer = NodeServicer(node, options, identity.node_id)
    if not isinstance(security, Insecure):
        servicer.signer, servicer.revocations = signer_for(security), revocations(security)
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    try:  # bound before the benchmark: a taken port or a wrong --host fails at once
        port = listen(server, f"{options.host}:{options.port}", security)
    except RuntimeError:
        identity.release()
        await server.stop(None)  # never started: stopping it here keeps its finalizer quiet
        raise OSError(listen_problem(options.host, options.port)) from None
    if not named:
        options.name = node.name = default_name(port)
    servicer.address = f"{options.host}:{port}"
    servicer.capability = (
        measure(memory_limit=options.memory_limit, state_dir=options.state_dir)
        if options.benchmark
        else Capability(memory_limit=options.memory_limit)
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watch_parent(stop))
    print(f"{READY_PREFIX} port={port} name={options.name}", file=ready_out, flush=True)
    log.info(
        "node %s listening on %s:%d (%s; low-bit layers on %s)",
        options.name,
        options.host,
        port,
        _security_line(security),
        native.status(),
    )
    advertiser = await start_advertising(servicer, port) if options.advertise else None
    remeasure = start_remeasuring(servicer, options.benchmark_every)
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        if remeasure is not None:
            remeasure.cancel()
        if advertiser is not None:  # withdraw first: browsers see the node leave before its port closes
            await advertiser.close()
        servicer.end_streams()
        await server.stop(STOP_GRACE_S)
        await node.unload()
        identity.release()
        log.info("node %s stopped", options.name)


def default_name(port: int) -> str:
    """A node's name when --name is not given: `hostname:port` (nodes sharing a machine get distinct names)."""
    return f"{socket.gethostname()}:{port}" if port else socket.gethostname()


def listen_problem(host: str, port: int) -> str:
    """Why the gRPC server could not listen on host:port, found with a plain socket (gRPC only says 'failed')."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"--host {host!r} is not an address or a name this machine can resolve; use 0.0.0.0 (all) or 127.0.0.1"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"port {port} on {host} is in use (another node or program listens there); "
                    "pick another --port, or --port 0 for a free one"
                )
            if e.errno == errno.EADDRNOTAVAIL:
                return (
                    f"--host {host} is not an address of this machine; use one of its addresses, "
                    "0.0.0.0 (all interfaces) or 127.0.0.1"
                )
            if e.errno == errno.EACCES:
                return f"port {port} needs root; use a port above 1023 (the default is 50051)"
            return f"cannot listen on {host}:{port}: {e.strerror}"
    return f"cannot listen on {host}:{port} (gRPC refused it; run with --debug for gRPC's reason)"


def _security(options: NodeOptions) -> Security:
    """The node's mode, made this process's (its next-hop channels use it); refuses to run without one."""
    from edgeshard.node.security.channels import ClusterKeyError, configure

    if options.security is None:
        raise ClusterKeyError("a node needs a cluster key or --insecure; see `edgeshard secret new`")
    configure(options.security)
    # the revocation list lives with the node's identity (it survives restarts; read now: a bad file stops
    # the node rather than letting revoked members back in)
    use_revocation_file((options.state_dir or default_state_dir()).expanduser() / "revocations.json")
    if not isinstance(options.security, Insecure):
        revocations(options.security)
    if isinstance(options.security, Insecure):
        log.warning(INSECURE_WARNING)
    return options.security


def _security_line(security: Security) -> str:
    if security is INSECURE:
        return "INSECURE"
    if isinstance(security, NodeCredentials):
        return f"TLS, own credentials as {security.name} (cluster id {security.fingerprint})"
    return f"TLS, cluster key id {security.fingerprint}"


def die_with_parent() -> None:
    """When started by `cluster` (EDGESHARD_PARENT_PID set): get SIGTERM when the parent dies (Linux).

    Set here in the child, not with Popen(preexec_fn=...): a preexec_fn forces a plain fork() in a parent
    that already runs gRPC threads, and gRPC's fork handlers then abort the child before it execs.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - the name from <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        sys.exit(0)


async def _watch_parent(stop: asyncio.Event) -> None:
    """Stop when the parent that started this node exits (a second line of defence after PDEATHSIG)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return
    while True:
        if os.getppid() != int(parent):
            stop.set()
            return
        await asyncio.sleep(1.0)


def options_from_args(args: argparse.Namespace) -> NodeOptions:
    """NodeOptions from parsed `add_node_args` flags."""
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.session_idle_timeout < 0:
        raise ValueError(f"--session-idle-timeout must be 0 or more seconds, got {args.session_idle_timeout}")
    if args.max_batch_rows < 1:
        raise ValueError(f"--max-batch-rows must be at least 1, got {args.max_batch_rows}")
    if args.model_dir is not None and not args.model_dir.expanduser().is_dir():
        raise FileNotFoundError(f"--model-dir {args.model_dir} is not a directory; create it or point at one")
    opts = NodeOptions(
        host=args.host,
        port=args.port,
        threads=args.threads,
        model_dir=args.model_dir,
        state_dir=args.state_dir,
        max_sessions=args.max_sessions,
        kv_budget=parse_size(args.kv_budget) if args.kv_budget else 0,
        session_idle_s=args.session_idle_timeout,
        max_batch_rows=args.max_batch_rows,
        compute=args.compute,
        advertise=not args.no_advertise,
        mdns_interfaces=list(args.mdns_interface),
        cluster=args.cluster,
        memory_limit=parse_size(args.memory_limit) if args.memory_limit else 0,
        cache_limit=parse_size(args.cache_limit) if args.cache_limit else 0,
        benchmark=not args.no_benchmark,
        benchmark_every=args.benchmark_every,
        security=security_from_args(args, required=True),  # ClusterKeyError (a ValueError) says what to do
    )
    if args.name:
        opts.name = args.name
    return opts


def run_node(args: argparse.Namespace) -> int:
    """Serve until stopped; exit code 0 on a clean stop."""
    die_with_parent()
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(serve(options_from_args(args)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m edgeshard.node.service.server`: the same flags as `edgeshard node`."""
    parser = argparse.ArgumentParser(prog="edgeshard-node", description="Serve model shards over gRPC.")
    add_node_args(parser)
    try:
        return run_node(parser.parse_args(argv))
    except ValueError as e:  # a bad flag or no cluster key: one line, as `edgeshard node` prints it
        print(f"edgeshard-node: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
