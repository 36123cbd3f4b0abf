"""ray-monitor: traces, metrics, GPU stats, alerts and autoscaling hints for Ray Serve.

The public surface. Where each part runs is the package layout: ``replica/`` inside every
Serve replica, ``aggregator/`` in the one aggregator actor, ``alerting/`` and ``quality/``
in the aggregator (rule files are also read by the CLI and the driver), ``gpu/`` in the
GPU-stats actor on every node, ``autoscaling/`` in Serve's controller (the policy) and the
aggregator (the hints), ``client/`` in the driver and the CLI, and ``common/`` everywhere.
"""

from ray_monitor.client.api import Monitor, connect, record_feedback, start, stop
from ray_monitor.common.config import StartConfig
from ray_monitor.common.errors import ConfigError, MonitorNotRunning, RayMonitorError
from ray_monitor.replica.middleware import monitor
from ray_monitor.replica.tracing import current_trace_id, serve_tracing_config

__version__ = "0.1.0"

__all__ = ["monitor", "start", "connect", "stop", "record_feedback", "Monitor", "StartConfig",
           "ConfigError", "MonitorNotRunning", "RayMonitorError", "serve_tracing_config",
           "current_trace_id", "__version__"]
