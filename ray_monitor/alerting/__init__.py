"""Runs in the aggregator (and the CLI, for rule files): rules, the alert state machine, export to Prometheus, notifications."""
