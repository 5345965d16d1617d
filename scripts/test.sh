#!/usr/bin/env bash
# Installs everything the tests need (Python packages, and Debian packages when run as root),
# then runs the test suite. This is the README's test command; CI calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Xvfb and the X/GL libraries Qt (napari) loads; Chromium for the browser test (Playwright drives it).
  pkgs="xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0 libxcb-randr0
        libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1 chromium"
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
fi
python -m pip install -q torch==2.13.0 -e ".[test]"
python -m ruff check .  # the lint rules in pyproject.toml
python -m pytest -q -p no:cacheprovider "$@"
