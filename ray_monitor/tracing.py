"""Public tracing entry points, for the import strings users write.

Runs wherever it is named: ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=
ray_monitor.tracing:serve_span_processors`` is loaded by Ray Serve in its proxy, controller
and every replica. The implementation lives in :mod:`ray_monitor.replica.tracing`.
"""

from ray_monitor.replica.tracing import (current_trace_id, serve_span_processors,
                                         serve_tracing_config)

__all__ = ["current_trace_id", "serve_span_processors", "serve_tracing_config"]
