"""ray-monitor: traces, metrics, GPU stats, alerts and autoscaling hints for Ray Serve."""

from ray_monitor.client.api import Monitor, MonitorNotRunning, connect, record_feedback, start, stop
from ray_monitor.replica.middleware import monitor
from ray_monitor.replica.tracing import current_trace_id, serve_tracing_config

__version__ = "0.1.0"

__all__ = ["monitor", "start", "connect", "stop", "record_feedback", "Monitor",
           "MonitorNotRunning", "serve_tracing_config", "current_trace_id", "__version__"]
