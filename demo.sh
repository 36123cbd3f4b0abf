#!/usr/bin/env bash
# The main demo: a monitored two-deployment Ray Serve app serving a scikit-learn model on
# a local Ray cluster; a fault phase whose alerts fire and resolve and whose latency
# scales the model out. About two minutes. Sets up .venv (with the `examples` extra) on
# the first run. Options: examples/demo.py --help (e.g. ./demo.sh --keep).
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS=examples source scripts/venv.sh
exec .venv/bin/python examples/demo.py "$@"
