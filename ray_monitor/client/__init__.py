"""Runs in the user's driver and the CLI: start/connect/stop and the command line."""
