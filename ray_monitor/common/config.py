"""The typed configuration of ``ray_monitor.start()``, as Ray Serve's ``AutoscalingConfig``.

Built in the driver (``start()``, ``ray-monitor start``), checked there, and handed to the
aggregator actor, which reads its fields. A bad value is refused at ``start()`` with a
:class:`~ray_monitor.common.errors.ConfigError` naming every bad field and the fix; an
option not passed falls back to its environment variable (:mod:`~ray_monitor.common.env`,
bad values logged and the default used) and then to the default written here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_monitor.common import env
from ray_monitor.common.errors import ConfigError, Problem

__all__ = ["StartConfig"]

_SOURCE = "ray_monitor.start()"
_NUMBERS = ("port", "eval_interval_s", "gpu_interval_s", "series_ttl_s", "feedback_horizon_s",
            "drift_reference_size", "max_series_per_metric", "top_tenants", "shards")


class StartConfig(BaseModel):
    """Everything ``ray_monitor.start()`` takes besides the rule file."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    host: str = Field(default_factory=env.HOST.get, min_length=1, description=(
        "Address the aggregator's HTTP server binds (/metrics, /api/v1, the status page). "
        "127.0.0.1 keeps it on the head node; 0.0.0.0 opens it to the network (set a "
        "token then). Env: RAY_MONITOR_HOST."))
    port: int = Field(default_factory=env.PORT.get, ge=0, le=65535, description=(
        "Its port; 0 picks a free one. A restarted aggregator keeps the port it had. "
        "Env: RAY_MONITOR_PORT."))
    token: Optional[str] = Field(default_factory=env.TOKEN.get, description=(
        "Bearer token that writes (reload, feedback, drift references) must send; without "
        "one, writes are accepted only on a loopback bind. Env: RAY_MONITOR_TOKEN."))
    eval_interval_s: float = Field(1.0, gt=0, description="How often alert rules run.")
    notifications: Optional[dict] = Field(None, description=(
        "Where alerts go: alertmanager, webhooks, slack, email, route (see the README)."))
    gpu: bool = Field(True, description="Start a GPU-stats actor on every node.")
    gpu_interval_s: float = Field(1.0, gt=0, description="How often each GPU is sampled.")
    node_fanin: bool = Field(True, description=(
        "Start a merger on every node with monitored replicas: its replicas deliver to it "
        "and it forwards one call per flush, so the aggregator's calls per second follow "
        "the nodes, not the replicas (see the README's 'Large clusters'). False: every "
        "replica calls the aggregator."))
    shards: int = Field(1, ge=1, le=64, description=(
        "Aggregator actors, each owning the applications that hash to it (crc32 of the "
        "name): shard 0 serves the one HTTP API, /metrics and alert view and gathers the "
        "others'. 1: one aggregator. Past about 1,800 replicas at the 1 s flush, or when "
        "rules, windows or memory outgrow one process (see the README's 'Large clusters')."))
    nvml_factory: Optional[str] = Field(None, description=(
        "'module:function' returning an NVML object (tests inject a fake NVML this way)."))
    series_ttl_s: float = Field(300.0, gt=0, description=(
        "Series of a replica that stopped reporting are dropped after this long."))
    max_series_per_metric: int = Field(5000, ge=100, le=1_000_000, description=(
        "Series the aggregator keeps per metric; label sets past it are counted under "
        "'other'. Each costs about 200 KiB with every window full (6 hours) and 2.5 KiB of "
        "/metrics: 5,000 is about 1 GiB and 12 MiB, for 1,000 replicas of 2 methods x 2 "
        "outcomes."))
    feedback_horizon_s: float = Field(3600.0, gt=0, description=(
        "How long a captured prediction waits for its ground truth."))
    drift_reference_size: int = Field(1000, gt=0, description=(
        "Observations that make a model's drift reference when none is set."))
    top_tenants: int = Field(10, ge=1, le=1000, description=(
        "Tenants per deployment with series of their own (the heaviest by requests); the "
        "rest are counted as 'other', so totals stay exact and labels bounded."))
    dashboard_url: str = Field("http://127.0.0.1:8265", description=(
        "Ray's dashboard, for autoscaling entries with apply: external."))

    @field_validator(*_NUMBERS, mode="before")
    @classmethod
    def _a_number(cls, v: Any) -> Any:
        # pydantic would take True as 1 and "5" as 5: a configuration that means
        # something else than it says.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"expected a number, got {type(v).__name__} {v!r:.60}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"expected a finite number, got {v!r}")
        return v

    @field_validator("nvml_factory")
    @classmethod
    def _import_path(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (":" not in v or not all(v.split(":", 1))):
            raise ValueError(f"expected 'module:function', got {v!r}")
        return v

    @field_validator("notifications")
    @classmethod
    def _notifications(cls, v: Optional[dict]) -> Optional[dict]:
        if v is not None:
            from ray_monitor.alerting.notify_config import NotifyConfig

            NotifyConfig.from_dict(v)  # raises ConfigError naming the field
        return v

    @classmethod
    def build(cls, config: Optional["StartConfig"] = None, **options: Any) -> "StartConfig":
        """A config from keyword options (over ``config`` when given), every problem
        reported at once as a :class:`ConfigError`."""
        base = {} if config is None else config.model_dump(exclude_unset=True)
        try:
            return cls(**{**base, **options})
        except ValidationError as e:
            raise _config_error(e) from None

    @classmethod
    def of(cls, value: "StartConfig | Mapping[str, Any] | None") -> "StartConfig":
        """``value`` itself, or a config built from a mapping of options."""
        if isinstance(value, cls):
            return value
        return cls.build(**dict(value or {}))


def _config_error(e: ValidationError) -> ConfigError:
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or None
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a bad notifications section names its own fields
            problems.extend(cause.problems)
            continue
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(StartConfig.model_fields))
            message = f"unknown option; the options are {known}"
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        problems.append(Problem(_SOURCE, field=loc, message=message))
    return ConfigError(problems)
