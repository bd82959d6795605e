#!/usr/bin/env bash
# Screenshot an sstoken report page (sstoken show --output report.html) with headless Chromium:
#   scripts/screenshot_report.sh report.html report.png [WIDTHxHEIGHT]     (default 1280x1600)
# Needs Debian's chromium (apt-get update && apt-get install -y chromium). Offline: the page is
# self-contained and Chromium's background networking is off.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 report.html out.png [WIDTHxHEIGHT]" >&2; exit 2
fi
page=$(realpath "$1"); out=$(realpath -m "$2"); size=${3:-1280x1600}
exe=$(command -v chromium || true)
if [ -z "$exe" ]; then
  echo "chromium not found: apt-get update && apt-get install -y chromium" >&2; exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out"
"$exe" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$out" "file://$page" 2>/dev/null || true
if [ -s "$out" ]; then echo "wrote $out"; else echo "no screenshot written" >&2; exit 1; fi
