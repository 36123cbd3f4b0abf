"""A model on the GPU where there is one, on the CPU otherwise, with the GPU figures the
monitor has.

    .venv/bin/python examples/gpu_model.py [--requests 40] [--batch 64]

The model is a small multi-layer perceptron (fixed, seeded weights: an embedding
classifier's shape and arithmetic) run on batches. With PyTorch installed and a GPU
visible it runs on ``cuda`` in a replica that asks Ray for one GPU; with PyTorch and no
GPU on the CPU; without PyTorch in numpy (PyTorch is not a dependency of ray-monitor:
``pip install torch`` to try it). The example checks the served results against the
same arithmetic in numpy here, and prints the device, the latency the monitor measured,
and what the monitor's per-node GPU actor reports: each GPU's utilization and memory and
the replica using it, or "no GPUs: REASON" on a machine without NVML. Starts a local
Ray; about 20 s in all. Exits 0 when the results agree and the monitor counted
every batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
from ray import serve

from ray_monitor import monitor

try:  # imported as examples.NAME (the tests) or run as a script (examples/ on sys.path)
    from examples._local import local_cluster
except ImportError:
    from _local import local_cluster

APP = "gpu-model"
LAYERS = (256, 1024, 1024, 10)


def weights(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The model's layers, ``(W, b)`` in float32, the same in every process."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32),
             rng.normal(0, 0.01, b).astype(np.float32)) for a, b in zip(LAYERS, LAYERS[1:])]


def forward_numpy(layers, x: np.ndarray) -> np.ndarray:
    """ReLU hidden layers, softmax output: class probabilities per row."""
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def backend() -> tuple[str, str]:
    """``(library, device)``: ("torch", "cuda"), ("torch", "cpu") or ("numpy", "cpu")."""
    try:
        import torch
    except ImportError:
        return "numpy", "cpu"
    return "torch", "cuda" if torch.cuda.is_available() else "cpu"


@serve.deployment(ray_actor_options={"num_cpus": 0})
@monitor(model_version="mlp-1")
class Model:
    def __init__(self) -> None:
        self.library, self.device = backend()
        layers = weights()
        if self.library == "torch":
            import torch

            self.layers = [(torch.from_numpy(w).to(self.device), torch.from_numpy(b).to(self.device))
                           for w, b in layers]
            self.name = (torch.cuda.get_device_name(0) if self.device == "cuda"
                         else "CPU") + f" (torch {torch.__version__})"
        else:
            self.layers = layers
            self.name = f"CPU (numpy {np.__version__}; torch is not installed)"

    def info(self) -> dict:
        return {"library": self.library, "device": self.device, "name": self.name}

    def __call__(self, batch: list) -> list:
        """Class probabilities for a batch of 256-dimensional inputs."""
        if self.library == "numpy":
            return forward_numpy(self.layers, np.asarray(batch, dtype=np.float32)).tolist()
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(batch, dtype=torch.float32, device=self.device)
            for i, (w, b) in enumerate(self.layers):
                x = x @ w + b
                if i < len(self.layers) - 1:
                    x = torch.relu(x)
            return torch.softmax(x, dim=1).cpu().tolist()


def ray_sees_a_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def gpu_lines(gpus: dict) -> list[str]:
    """The monitor's latest GPU snapshot of each node, a line per GPU."""
    lines = []
    for node, snap in sorted(gpus.items()):
        snap = dataclasses.asdict(snap) if dataclasses.is_dataclass(snap) else snap
        if not snap.get("devices"):
            lines.append(f"node {node[:12]}: no GPUs: {snap.get('no_gpus_reason') or 'none found'}")
            continue
        for dev in snap["devices"]:
            v = dev.get("values") or {}
            users = sorted({(p.get("replica") or {}).get("replica", "") for p in snap.get("processes") or ()
                            if p.get("gpu_index") == dev["index"] and p.get("replica")})
            util = v.get("utilization_ratio")
            used, total = v.get("memory_used_bytes"), v.get("memory_total_bytes")
            lines.append(
                f"node {node[:12]} GPU {dev['index']} {dev.get('model', '?')}: "
                f"utilization {'-' if util is None else f'{util:.0%}'}, memory "
                f"{'-' if used is None or total is None else f'{used / 2**30:.1f}/{total / 2**30:.1f} GiB'}"
                f", replicas: {', '.join(users) or 'none'}")
    return lines


def run(mon, *, app: str = APP, requests: int = 40, batch: int = 64,
        timeout_s: float = 60.0) -> int:
    """Deploys the model as ``app`` (on a GPU when Ray has one), sends ``requests``
    batches through a handle, prints the device and the monitor's figures; 0 on success."""
    deployment = Model
    if ray_sees_a_gpu():
        deployment = Model.options(ray_actor_options={"num_cpus": 0, "num_gpus": 1})
    handle = serve.run(deployment.bind(), name=app, route_prefix=None)
    info = handle.info.remote().result()
    print(f"model runs on {info['device']}: {info['name']}")

    layers = weights()
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(requests):
        x = rng.normal(size=(batch, LAYERS[0])).astype(np.float32)
        got = np.asarray(handle.remote(x.tolist()).result())
        worst = max(worst, float(np.abs(got - forward_numpy(layers, x)).max()))
    # float32 on another device sums in another order: agree to well within a percent
    agree = worst < 1e-3
    print(f"{requests} batches of {batch}: largest difference from numpy here {worst:.2e} "
          f"({'agree' if agree else 'DISAGREE'})")

    deadline = time.monotonic() + timeout_s
    key = json.dumps({"application": app, "method": "__call__"}, sort_keys=True)
    while (n := mon.query("count", "requests", 600.0, by=("application", "method")).get(key)) != requests:
        if time.monotonic() > deadline:
            print(f"the monitor counted {n} batches after {timeout_s:.0f}s, expected {requests}",
                  file=sys.stderr)
            return 1
        time.sleep(0.5)
    p50 = mon.query("p50", "latency_seconds", 600.0, by=("application", "method"))[key]
    p99 = mon.query("p99", "latency_seconds", 600.0, by=("application", "method"))[key]
    print(f"the monitor counted {requests} batches: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")

    # The GPU actor of each node samples once a second; wait for a first snapshot.
    deadline = time.monotonic() + timeout_s
    while not (gpus := mon.gpus()) and time.monotonic() < deadline:
        time.sleep(0.5)
    print("GPUs as the monitor sees them:")
    for line in gpu_lines(gpus) or ["no GPU snapshot yet (is the monitor started with gpu=False?)"]:
        print(f"  {line}")
    print(f"metrics: {mon.metrics_url} (ray_monitor_gpu_utilization_ratio, "
          "ray_monitor_replica_gpu_memory_bytes, ...)")
    return 0 if agree else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="batches to send (default 40)")
    parser.add_argument("--batch", type=int, default=64, help="rows per batch (default 64)")
    args = parser.parse_args(argv)
    with local_cluster() as (mon, _):  # gpu=True: one GPU-stats actor per node
        return run(mon, requests=args.requests, batch=args.batch)


if __name__ == "__main__":
    sys.exit(main())
