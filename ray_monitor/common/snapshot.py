"""What replicas and GPU actors send to the aggregator: plain, picklable value types.

Imported by replicas and GPU actors (which build them) and the aggregator (which reads them).

A replica snapshot is a *delta*: the requests that finished between ``start`` and
``end`` (wall-clock seconds), so the aggregator only ever adds. Gauges (in-flight,
health) are the value at ``end``. ``seq`` increases by one per snapshot a replica
produces, so the aggregator can tell a gap (snapshots dropped while it was away)
from a restart of the replica (a new ``replica`` id).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from ray_monitor.common.histogram import Histogram

__all__ = ["OK", "Exemplar", "GenAIDelta", "GpuDevice", "GpuProcess", "GpuSnapshot",
           "HungRequest", "ReplicaHealth", "ReplicaIdentity", "ReplicaSnapshot", "SeriesDelta",
           "UsageDelta"]

OK = "ok"


@dataclass(frozen=True)
class ReplicaIdentity:
    application: str
    deployment: str
    replica: str
    node_id: str
    pid: int
    model_version: str = ""


class Exemplar(NamedTuple):
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    value: float
    timestamp: float


@dataclass
class SeriesDelta:
    """Requests of one method with one outcome, finished inside the snapshot's window.

    ``outcome`` is ``"ok"``, the exception's type name, or the HTTP status code as a
    string for ingress routes; ``error`` says whether the outcome counts as an error
    (any exception, or an HTTP status of 500 and above).
    """

    method: str
    outcome: str
    error: bool
    latency: Histogram
    first_item: Optional[Histogram] = None  # streaming methods: time to first item
    exemplars: dict[int, Exemplar] = field(default_factory=dict)  # latency bucket -> trace
    genai: Optional["GenAIDelta"] = None  # streams and requests with token usage

    @property
    def count(self) -> int:
        return self.latency.count


@dataclass
class GenAIDelta:
    """Per-request stream and token figures of one method and outcome (issue 14).

    Each histogram holds one sample per request, except ``gaps`` (one per pair of
    consecutive items). ``time_per_token`` is ``(last - first) / (n - 1)`` with ``n`` the
    output tokens when known, else the items; ``items`` counts items per stream and
    ``items_per_s`` is ``items / duration``. ``input_tokens``/``output_tokens`` are
    tokens per request (their ``sum`` is exact: integers below 2**53). ``queue`` is the
    time from the caller's send to the replica's start, for requests whose caller carried
    its send time (any request, streamed or not), and ``first_with_queue`` is ``queue``
    plus the time to first item of those that streamed."""

    time_per_token: Optional[Histogram] = None
    gaps: Optional[Histogram] = None
    items: Optional[Histogram] = None
    items_per_s: Optional[Histogram] = None
    input_tokens: Optional[Histogram] = None
    output_tokens: Optional[Histogram] = None
    queue: Optional[Histogram] = None
    first_with_queue: Optional[Histogram] = None


@dataclass
class UsageDelta:
    """Requests of one (model, tenant) of a deployment in a snapshot's window.

    ``tenant`` is ``""`` when the deployment names no tenant, and ``"other"`` for tenants
    past the replica's per-snapshot cap. ``model`` is the model the response named
    (OpenAI ``model``), else the extractor's, else ``""``.

    ``pairs``: (input, output) tokens of each token-counted request -> how many requests
    had them, so the aggregator prices each request (``request_cost``); ``rest`` counts the
    token-counted requests past the replica's bound on pairs (priced at the entry's mean).
    """

    model: str
    tenant: str
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency: Histogram = field(default_factory=Histogram)
    pairs: dict[tuple[int, int], int] = field(default_factory=dict)
    rest: int = 0


@dataclass
class HungRequest:
    method: str
    request_id: str
    running_s: float
    stack: str  # all threads of the replica, bounded in size


@dataclass
class ReplicaHealth:
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    loop_lag_s: Optional[float] = None  # None for replicas without an event loop to watch
    longest_request_s: float = 0.0
    hung: list[HungRequest] = field(default_factory=list)


@dataclass
class ReplicaSnapshot:
    identity: ReplicaIdentity
    seq: int
    start: float
    end: float
    series: list[SeriesDelta] = field(default_factory=list)
    inflight: dict[str, int] = field(default_factory=dict)  # method -> requests running at end
    health: Optional[ReplicaHealth] = None
    self_errors: dict[str, int] = field(default_factory=dict)  # cause -> count, cumulative
    dropped: int = 0  # snapshots this replica dropped because its buffer was full, cumulative
    # quality.Prediction of requests finished in the window (deployments with an extractor)
    predictions: list[Any] = field(default_factory=list)
    # span records (tracing.span_record) of failed and slow requests, and head-sampled
    # spans as their context, that ended in the window; bounded per snapshot
    traces: list[dict] = field(default_factory=list)
    # requests finished since the replica started, "method\toutcome" -> count: what a
    # restarted aggregator reads as the replica's own counters, and checks deliveries by
    totals: dict[str, int] = field(default_factory=dict)
    flush_s: Optional[float] = None  # how long the replica's previous flush took
    flush_max_s: float = 0.0  # its longest flush since it started
    # trace ids (hex) of requests this replica kept (a failed or slow span) in the window:
    # the aggregator names them to every replica, which exports what it holds of them
    kept_traces: list[str] = field(default_factory=list)
    # methods whose requests are labelled by route (an ASGI ingress): in ``inflight``, but
    # never a request series of their own, so they get no zero series
    routed: list[str] = field(default_factory=list)
    # per (model, tenant) usage of requests finished in the window (issue 14), bounded
    usage: list[UsageDelta] = field(default_factory=list)


@dataclass
class GpuDevice:
    """One GPU (or MIG device) at one sample. Absent readings are left out of ``values``.

    ``values`` keys (base units): ``utilization_ratio``, ``memory_utilization_ratio``,
    ``memory_used_bytes``, ``memory_free_bytes``, ``memory_total_bytes``,
    ``memory_reserved_bytes``, ``power_watts``, ``power_limit_watts``, ``energy_joules``,
    ``temperature_celsius``, ``sm_clock_hz``, ``memory_clock_hz``, ``throttle_reasons``
    (NVML bit mask), ``throttled`` (0/1, a reason other than idle), ``ecc_corrected_total``,
    ``ecc_uncorrected_total``, ``pcie_replay_total``.
    """

    index: int
    uuid: str
    model: str
    values: dict[str, float] = field(default_factory=dict)
    xid_errors: dict[int, int] = field(default_factory=dict)  # XID code -> count, cumulative
    mig_parent: Optional[int] = None  # index of the physical GPU for a MIG device
    lost: bool = False  # fell off the bus: reported, sampling goes on for the others


@dataclass
class GpuProcess:
    gpu_index: int
    gpu_uuid: str
    pid: int
    memory_bytes: Optional[int]
    sm_utilization_ratio: Optional[float]  # None where NVML cannot say (MIG, no sample yet)
    ancestors: tuple[int, ...] = ()  # parent pids, nearest first: a replica's child processes
    replica: Optional[ReplicaIdentity] = None  # filled by the join; None: no Serve replica


@dataclass
class GpuSnapshot:
    node_id: str
    time: float
    devices: list[GpuDevice] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    no_gpus_reason: Optional[str] = None  # set when NVML is unusable on this node
    self_errors: dict[str, int] = field(default_factory=dict)  # cause -> count, cumulative
