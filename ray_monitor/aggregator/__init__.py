"""Runs in the aggregator actor (one per cluster): windows, HTTP, status page."""
