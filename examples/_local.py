"""What every example does first: a Ray of its own, ray-monitor, and Serve on loopback."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(**monitor_options) -> Iterator[tuple]:
    """``(monitor, Serve's HTTP base URL)`` on a local Ray that ends with the block.

    ``address="local"`` starts a Ray of its own, so the clean-up never touches a cluster
    that was already running."""
    import ray
    from ray import serve

    import ray_monitor

    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        mon = ray_monitor.start(port=0, **monitor_options)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield mon, f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()  # the cluster is this process's own: Serve and the monitor stop with it
