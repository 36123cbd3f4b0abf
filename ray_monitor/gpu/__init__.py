"""Runs in the GPU-stats actor on every node: NVML sampling."""
