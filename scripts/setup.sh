#!/usr/bin/env bash
# Set-up for a fresh machine (Debian/Ubuntu, Python >= 3.10): the Debian speech packages, then a virtual
# environment with the project installed. Idempotent: a second run checks and skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

bash scripts/setup-system.sh

# Reinstall only when pyproject.toml changed since the last successful install.
stamp="$VENV/.asrlab-installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import asrlab" 2>/dev/null; then
  echo "[setup] $VENV up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
"$VENV/bin/python" -c "import asrlab, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "[setup] installed asrlab into $VENV"
