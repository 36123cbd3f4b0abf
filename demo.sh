#!/usr/bin/env bash
# The main demo: a monitored Ray Serve app on a local Ray cluster, with a fault phase
# whose alerts fire and resolve. Sets up .venv on the first run.
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS= source scripts/venv.sh
exec .venv/bin/python examples/demo.py "$@"
