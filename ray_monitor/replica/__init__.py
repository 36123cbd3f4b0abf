"""Runs inside every Serve replica: the decorator, the request path, the recorder and delivery of its snapshots."""
