"""Runs in the node merger actor on every node with monitored replicas: the node's fan-in."""
