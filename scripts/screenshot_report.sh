#!/usr/bin/env bash
# Screenshot an sstoken report page with headless Chromium (Debian's `chromium`):
#   scripts/screenshot_report.sh report.html report.png [WIDTHxHEIGHT]
set -euo pipefail
page=$(realpath "$1"); out=$2; size=${3:-1280x1600}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$(realpath -m "$out")" "file://$page" 2>/dev/null
test -s "$out" && echo "wrote $out"
