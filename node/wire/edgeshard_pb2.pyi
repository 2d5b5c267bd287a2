from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]

class ResultKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_UNSPECIFIED: _ClassVar[ResultKind]
    RESULT_READY: _ClassVar[ResultKind]
    RESULT_OPENED: _ClassVar[ResultKind]
    RESULT_TOKEN: _ClassVar[ResultKind]
    RESULT_ERROR: _ClassVar[ResultKind]
    RESULT_ENDED: _ClassVar[ResultKind]

class RecoverAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECOVER_UNSPECIFIED: _ClassVar[RecoverAction]
    RECOVER_KEEP: _ClassVar[RecoverAction]
    RECOVER_FILL: _ClassVar[RecoverAction]
    RECOVER_FEED_NEXT: _ClassVar[RecoverAction]
DTYPE_UNSPECIFIED: DType
DTYPE_BF16: DType
DTYPE_F16: DType
DTYPE_F32: DType
RESULT_UNSPECIFIED: ResultKind
RESULT_READY: ResultKind
RESULT_OPENED: ResultKind
RESULT_TOKEN: ResultKind
RESULT_ERROR: ResultKind
RESULT_ENDED: ResultKind
RECOVER_UNSPECIFIED: RecoverAction
RECOVER_KEEP: RecoverAction
RECOVER_FILL: RecoverAction
RECOVER_FEED_NEXT: RecoverAction

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "node")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    node: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("creds_challenge",)
    CREDS_CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    creds_challenge: bytes
    def __init__(self, creds_challenge: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("cores", "memory_total", "memory_free", "arch", "torch_threads", "platform", "quant_formats", "benchmark", "memory_limit", "kernels")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    TORCH_THREADS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    QUANT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    BENCHMARK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_total: int
    memory_free: int
    arch: str
    torch_threads: int
    platform: str
    quant_formats: _containers.RepeatedScalarFieldContainer[str]
    benchmark: Benchmark
    memory_limit: int
    kernels: str
    def __init__(self, cores: _Optional[int] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ..., arch: _Optional[str] = ..., torch_threads: _Optional[int] = ..., platform: _Optional[str] = ..., quant_formats: _Optional[_Iterable[str]] = ..., benchmark: _Optional[_Union[Benchmark, _Mapping]] = ..., memory_limit: _Optional[int] = ..., kernels: _Optional[str] = ...) -> None: ...

class Benchmark(_message.Message):
    __slots__ = ("mem_gbps", "int4_gbps", "int8_gbps", "bf16_gbps", "f32_gbps", "layer_overhead_ms", "step_overhead_ms", "bench_ms")
    MEM_GBPS_FIELD_NUMBER: _ClassVar[int]
    INT4_GBPS_FIELD_NUMBER: _ClassVar[int]
    INT8_GBPS_FIELD_NUMBER: _ClassVar[int]
    BF16_GBPS_FIELD_NUMBER: _ClassVar[int]
    F32_GBPS_FIELD_NUMBER: _ClassVar[int]
    LAYER_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    BENCH_MS_FIELD_NUMBER: _ClassVar[int]
    mem_gbps: float
    int4_gbps: float
    int8_gbps: float
    bf16_gbps: float
    f32_gbps: float
    layer_overhead_ms: float
    step_overhead_ms: float
    bench_ms: float
    def __init__(self, mem_gbps: _Optional[float] = ..., int4_gbps: _Optional[float] = ..., int8_gbps: _Optional[float] = ..., bf16_gbps: _Optional[float] = ..., f32_gbps: _Optional[float] = ..., layer_overhead_ms: _Optional[float] = ..., step_overhead_ms: _Optional[float] = ..., bench_ms: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("model", "start_layer", "end_layer", "num_layers", "quant", "plan_id", "weight_bytes", "next_hop", "load_s", "wire_dtype", "hidden_size", "vocab_size", "kv_bytes_per_position", "kv_budget", "kept_bytes_per_position", "holder", "held", "kernels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_FIELD_NUMBER: _ClassVar[int]
    KEPT_BYTES_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_layer: int
    end_layer: int
    num_layers: int
    quant: str
    plan_id: int
    weight_bytes: int
    next_hop: str
    load_s: float
    wire_dtype: DType
    hidden_size: int
    vocab_size: int
    kv_bytes_per_position: int
    kv_budget: int
    kept_bytes_per_position: int
    holder: PlanHolder
    held: bool
    kernels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., num_layers: _Optional[int] = ..., quant: _Optional[str] = ..., plan_id: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., next_hop: _Optional[str] = ..., load_s: _Optional[float] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_bytes_per_position: _Optional[int] = ..., kv_budget: _Optional[int] = ..., kept_bytes_per_position: _Optional[int] = ..., holder: _Optional[_Union[PlanHolder, _Mapping]] = ..., held: _Optional[bool] = ..., kernels: _Optional[_Iterable[str]] = ...) -> None: ...

class NodeStats(_message.Message):
    __slots__ = ("steps", "messages", "compute_ms", "network_ms", "errors", "sessions", "kv_bytes", "wall_ms", "idle_ms", "queue_ms", "rows", "sequences", "batch_hist", "kv_reserved", "frames", "recovered_rows", "kept_bytes", "fed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_MS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BATCH_HIST_FIELD_NUMBER: _ClassVar[int]
    KV_RESERVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_ROWS_FIELD_NUMBER: _ClassVar[int]
    KEPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    messages: int
    compute_ms: float
    network_ms: float
    errors: int
    sessions: int
    kv_bytes: int
    wall_ms: float
    idle_ms: float
    queue_ms: float
    rows: int
    sequences: int
    batch_hist: _containers.RepeatedScalarFieldContainer[int]
    kv_reserved: int
    frames: int
    recovered_rows: int
    kept_bytes: int
    fed: int
    def __init__(self, steps: _Optional[int] = ..., messages: _Optional[int] = ..., compute_ms: _Optional[float] = ..., network_ms: _Optional[float] = ..., errors: _Optional[int] = ..., sessions: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., wall_ms: _Optional[float] = ..., idle_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., rows: _Optional[int] = ..., sequences: _Optional[int] = ..., batch_hist: _Optional[_Iterable[int]] = ..., kv_reserved: _Optional[int] = ..., frames: _Optional[int] = ..., recovered_rows: _Optional[int] = ..., kept_bytes: _Optional[int] = ..., fed: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "protocol_version", "capabilities", "loaded", "shard", "max_sessions", "stats", "address", "cluster", "clock_unix_s", "version", "creds_certificate", "creds_signature", "creds_revocation_seq")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    CLOCK_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREDS_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CREDS_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CREDS_REVOCATION_SEQ_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    protocol_version: int
    capabilities: Capabilities
    loaded: bool
    shard: ShardInfo
    max_sessions: int
    stats: NodeStats
    address: str
    cluster: str
    clock_unix_s: float
    version: str
    creds_certificate: bytes
    creds_signature: bytes
    creds_revocation_seq: int
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., protocol_version: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., loaded: _Optional[bool] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ..., max_sessions: _Optional[int] = ..., stats: _Optional[_Union[NodeStats, _Mapping]] = ..., address: _Optional[str] = ..., cluster: _Optional[str] = ..., clock_unix_s: _Optional[float] = ..., version: _Optional[str] = ..., creds_certificate: _Optional[bytes] = ..., creds_signature: _Optional[bytes] = ..., creds_revocation_seq: _Optional[int] = ...) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("model", "start_layer", "end_layer", "quant", "plan_id", "next_hop", "num_layers", "stages", "slice_manifest", "coordinator", "take_over")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    SLICE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    TAKE_OVER_FIELD_NUMBER: _ClassVar[int]
    model: str
    start_layer: int
    end_layer: int
    quant: str
    plan_id: int
    next_hop: str
    num_layers: int
    stages: int
    slice_manifest: str
    coordinator: PlanHolder
    take_over: bool
    def __init__(self, model: _Optional[str] = ..., start_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., quant: _Optional[str] = ..., plan_id: _Optional[int] = ..., next_hop: _Optional[str] = ..., num_layers: _Optional[int] = ..., stages: _Optional[int] = ..., slice_manifest: _Optional[str] = ..., coordinator: _Optional[_Union[PlanHolder, _Mapping]] = ..., take_over: _Optional[bool] = ...) -> None: ...

class PlanHolder(_message.Message):
    __slots__ = ("id", "name", "host", "since_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    host: str
    since_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., host: _Optional[str] = ..., since_unix_ms: _Optional[int] = ...) -> None: ...

class ReleasePlanRequest(_message.Message):
    __slots__ = ("coordinator_id", "plan_id")
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    coordinator_id: str
    plan_id: int
    def __init__(self, coordinator_id: _Optional[str] = ..., plan_id: _Optional[int] = ...) -> None: ...

class ReleasePlanReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class CredsRevocations(_message.Message):
    __slots__ = ("signed_list",)
    SIGNED_LIST_FIELD_NUMBER: _ClassVar[int]
    signed_list: bytes
    def __init__(self, signed_list: _Optional[bytes] = ...) -> None: ...

class CredsRevocationsReply(_message.Message):
    __slots__ = ("accepted", "seq", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    seq: int
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LoadProgress(_message.Message):
    __slots__ = ("stage", "tensors_done", "tensors_total", "bytes_done", "done", "shard")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    stage: str
    tensors_done: int
    tensors_total: int
    bytes_done: int
    done: bool
    shard: ShardInfo
    def __init__(self, stage: _Optional[str] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., done: _Optional[bool] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("sampling", "reply_to", "max_len")
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    sampling: SamplingParams
    reply_to: str
    max_len: int
    def __init__(self, sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reply_to: _Optional[str] = ..., max_len: _Optional[int] = ...) -> None: ...

class EndSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardMessage(_message.Message):
    __slots__ = ("plan_id", "session_id", "start", "sample", "tokens", "hidden", "open", "end", "error", "sent_at_us", "burst_left", "batch", "draft", "feed", "fed")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    BURST_LEFT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    FED_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    session_id: str
    start: int
    sample: bool
    tokens: TokenIds
    hidden: Tensor
    open: OpenSession
    end: EndSession
    error: Error
    sent_at_us: int
    burst_left: int
    batch: _containers.RepeatedCompositeFieldContainer[ForwardMessage]
    draft: _containers.RepeatedScalarFieldContainer[int]
    feed: TokenFeed
    fed: bool
    def __init__(self, plan_id: _Optional[int] = ..., session_id: _Optional[str] = ..., start: _Optional[int] = ..., sample: _Optional[bool] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., end: _Optional[_Union[EndSession, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., sent_at_us: _Optional[int] = ..., burst_left: _Optional[int] = ..., batch: _Optional[_Iterable[_Union[ForwardMessage, _Mapping]]] = ..., draft: _Optional[_Iterable[int]] = ..., feed: _Optional[_Union[TokenFeed, _Mapping]] = ..., fed: _Optional[bool] = ...) -> None: ...

class TokenFeed(_message.Message):
    __slots__ = ("first_node", "until", "stop_ids", "results_every")
    FIRST_NODE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_EVERY_FIELD_NUMBER: _ClassVar[int]
    first_node: str
    until: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    results_every: int
    def __init__(self, first_node: _Optional[str] = ..., until: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., results_every: _Optional[int] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("plan_id", "session_id", "start", "error")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    session_id: str
    start: int
    error: Error
    def __init__(self, plan_id: _Optional[int] = ..., session_id: _Optional[str] = ..., start: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("subscriber", "plan_id")
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    plan_id: int
    def __init__(self, subscriber: _Optional[str] = ..., plan_id: _Optional[int] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("kind", "plan_id", "session_id", "start", "sampled", "token", "error", "sent_at_us", "batch", "tokens", "feeding")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEEDING_FIELD_NUMBER: _ClassVar[int]
    kind: ResultKind
    plan_id: int
    session_id: str
    start: int
    sampled: bool
    token: int
    error: Error
    sent_at_us: int
    batch: _containers.RepeatedCompositeFieldContainer[Result]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    feeding: bool
    def __init__(self, kind: _Optional[_Union[ResultKind, str]] = ..., plan_id: _Optional[int] = ..., session_id: _Optional[str] = ..., start: _Optional[int] = ..., sampled: _Optional[bool] = ..., token: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., sent_at_us: _Optional[int] = ..., batch: _Optional[_Iterable[_Union[Result, _Mapping]]] = ..., tokens: _Optional[_Iterable[int]] = ..., feeding: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("reply_bytes", "payload")
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    reply_bytes: int
    payload: bytes
    def __init__(self, reply_bytes: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("ok", "loaded", "plan_id", "payload")
    OK_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    loaded: bool
    plan_id: int
    payload: bytes
    def __init__(self, ok: _Optional[bool] = ..., loaded: _Optional[bool] = ..., plan_id: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SliceTensor(_message.Message):
    __slots__ = ("name", "ggml_type", "shape", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GGML_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    ggml_type: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., ggml_type: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class SliceManifest(_message.Message):
    __slots__ = ("id", "model", "metadata_json", "tensors")
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model: str
    metadata_json: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[SliceTensor]
    def __init__(self, id: _Optional[str] = ..., model: _Optional[str] = ..., metadata_json: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[SliceTensor, _Mapping]]] = ...) -> None: ...

class SliceStatusRequest(_message.Message):
    __slots__ = ("manifest", "model", "want", "query_only")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    QUERY_ONLY_FIELD_NUMBER: _ClassVar[int]
    manifest: SliceManifest
    model: str
    want: _containers.RepeatedScalarFieldContainer[str]
    query_only: bool
    def __init__(self, manifest: _Optional[_Union[SliceManifest, _Mapping]] = ..., model: _Optional[str] = ..., want: _Optional[_Iterable[str]] = ..., query_only: _Optional[bool] = ...) -> None: ...

class SliceStatusReply(_message.Message):
    __slots__ = ("has_model", "have", "cache_bytes", "cache_limit", "partial")
    HAS_MODEL_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    has_model: bool
    have: _containers.RepeatedScalarFieldContainer[str]
    cache_bytes: int
    cache_limit: int
    partial: _containers.RepeatedCompositeFieldContainer[ShipPartial]
    def __init__(self, has_model: _Optional[bool] = ..., have: _Optional[_Iterable[str]] = ..., cache_bytes: _Optional[int] = ..., cache_limit: _Optional[int] = ..., partial: _Optional[_Iterable[_Union[ShipPartial, _Mapping]]] = ...) -> None: ...

class ShipPartial(_message.Message):
    __slots__ = ("sha256", "bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    bytes: int
    def __init__(self, sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ReadSliceRequest(_message.Message):
    __slots__ = ("manifest_id", "tensors")
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[ShipPartial]
    def __init__(self, manifest_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[ShipPartial, _Mapping]]] = ...) -> None: ...

class PullSliceRequest(_message.Message):
    __slots__ = ("manifest_id", "source", "want")
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WANT_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    source: str
    want: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, manifest_id: _Optional[str] = ..., source: _Optional[str] = ..., want: _Optional[_Iterable[str]] = ...) -> None: ...

class SliceManifestOfRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class PullSliceProgress(_message.Message):
    __slots__ = ("bytes_received", "bytes_total", "admitted", "rejected", "done")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_total: int
    admitted: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    done: bool
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_total: _Optional[int] = ..., admitted: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ..., done: _Optional[bool] = ...) -> None: ...

class SliceChunk(_message.Message):
    __slots__ = ("manifest_id", "sha256", "offset", "data", "last")
    MANIFEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    manifest_id: str
    sha256: str
    offset: int
    data: bytes
    last: bool
    def __init__(self, manifest_id: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class ShipSliceReply(_message.Message):
    __slots__ = ("admitted", "rejected", "bytes_received")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    admitted: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    bytes_received: int
    def __init__(self, admitted: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class RecoverMessage(_message.Message):
    __slots__ = ("plan_id", "session_id", "action", "positions", "open", "starts", "start", "tokens", "hidden")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    plan_id: int
    session_id: str
    action: RecoverAction
    positions: int
    open: OpenSession
    starts: _containers.RepeatedScalarFieldContainer[int]
    start: int
    tokens: TokenIds
    hidden: Tensor
    def __init__(self, plan_id: _Optional[int] = ..., session_id: _Optional[str] = ..., action: _Optional[_Union[RecoverAction, str]] = ..., positions: _Optional[int] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., starts: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RecoverReply(_message.Message):
    __slots__ = ("held", "kept", "rows", "compute_ms")
    HELD_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    held: int
    kept: int
    rows: int
    compute_ms: float
    def __init__(self, held: _Optional[int] = ..., kept: _Optional[int] = ..., rows: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...
