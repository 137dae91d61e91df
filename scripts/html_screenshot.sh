#!/usr/bin/env bash
# Render an attncheck HTML report in headless Chromium and save a PNG screenshot, so a person
# (or a test) can look at what a browser really shows.
#   scripts/html_screenshot.sh REPORT.html OUT.png [WIDTH [HEIGHT]]
# Needs Debian's chromium (`apt-get install -y chromium`); exits 3 when it is absent.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH [HEIGHT]]" >&2
    exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
width=${3:-1400}
height=${4:-2000}
[ -f "$report" ] || { echo "$0: $report: no such file" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "$0: chromium not found (apt-get install -y chromium)" >&2; exit 3; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$profile" --hide-scrollbars \
    --screenshot="$out" --window-size="$width,$height" "file://$report" >/dev/null 2>&1
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
