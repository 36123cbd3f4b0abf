#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests on a real Ray cluster, and
# end-to-end tests against real Prometheus, Alertmanager and an OTLP receiver on
# loopback. Installs what it needs on a Debian machine (as root, or with sudo).
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages the end-to-end tests start for real.
missing=()
# Chromium drives the status page's browser test (Playwright uses Debian's build; it
# never downloads a browser of its own).
for pair in prometheus:prometheus promtool:prometheus \
            prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager \
            chromium:chromium; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

EXTRAS=test source scripts/venv.sh
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=15 \
  --junitxml=test-artifacts/junit.xml "$@"
