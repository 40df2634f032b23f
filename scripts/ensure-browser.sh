#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver (for the report's end-to-end browser test) when missing.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "Chromium is missing: run 'sudo apt-get install chromium chromium-driver'" >&2
  echo "(the report's browser test, tests/e2e, needs /usr/bin/chromium and /usr/bin/chromedriver)." >&2
  exit 1
fi
