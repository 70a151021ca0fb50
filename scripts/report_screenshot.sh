#!/usr/bin/env bash
# The README's picture of the HTML report: the demo recording exported as HTML and rendered by
# headless Chromium (Debian's `chromium` package: apt-get install chromium). From the repo root:
#
#   scripts/report_screenshot.sh [BIN]      (BIN: default target/release/moescope)
#
# Writes recordings/demo-tiny-moe.report.html (ignored) and recordings/demo-tiny-moe.report.png.
set -euo pipefail
BIN=${1:-target/release/moescope}
HTML=recordings/demo-tiny-moe.report.html
PNG=recordings/demo-tiny-moe.report.png
"$BIN" export recordings/demo-tiny-moe.ndjson --format html -o "$HTML"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,2820 \
  --screenshot="$PWD/$PNG" "file://$PWD/$HTML" 2>/dev/null
echo "wrote $PNG"
