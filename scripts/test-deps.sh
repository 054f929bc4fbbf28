#!/usr/bin/env bash
# What the tests need beyond .venv: Debian's chromium, for the test that renders the HTML report
# headless. Installed where missing and possible (root with apt-get); otherwise say so: the test
# skips outside CI and fails in CI (CI=true), where it must run.
set -uo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing chromium (Debian) for the report test..."
  if (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }); then
    exit 0
  fi
fi
echo "note: chromium is not installed and could not be (needs root and apt-get); the report's browser test will skip"
