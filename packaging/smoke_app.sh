#!/usr/bin/env bash
# Run the frozen app: `inspect demo` must list the demo's layers, and the window must come up
# offscreen, build its views and save a screenshot. Prints the folder's size and the times.
#   bash packaging/smoke_app.sh [dist/compression-studio]
set -euo pipefail
cd "$(dirname "$0")/.."
app=${1:-dist/compression-studio}
exe="$app/compression-studio"
work=$(mktemp -d)
export COMPRESSION_STUDIO_CONFIG="$work/config" COMPRESSION_STUDIO_CACHE="$work/cache"

echo "size: $(du -sh "$app" | cut -f1)"
start=$(date +%s.%N)
"$exe" inspect demo --json > "$work/inspect.json"
echo "inspect demo: $(echo "$(date +%s.%N) - $start" | bc) s (first open: de-quantizes the GGUF)"
python3 - "$work/inspect.json" <<'PY'
import json, sys
layers = json.load(open(sys.argv[1]))["layers"]
assert len(layers) == 212, len(layers)
print(f"inspect demo: {len(layers)} layers")
PY
start=$(date +%s.%N)
QT_QPA_PLATFORM=offscreen timeout 300 "$exe" open --screenshot "$work/window.png" 2> "$work/window.log"
echo "window: $(grep -h 'window shown' "$work/window.log"); views built and saved after" \
     "$(echo "$(date +%s.%N) - $start" | bc) s"
test -s "$work/window.png"
echo "smoke test passed ($work)"
