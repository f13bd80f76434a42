#!/usr/bin/env bash
# Create or reuse the virtual environment .venv and install the pinned requirements into it.
# Reinstalls only when requirements.txt changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: Python 3.11 is required (torch==2.14.1 wheels), found $("$python" --version 2>&1)." \
       "Install Python 3.11 or set PYTHON=/path/to/python3.11." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "Creating the virtual environment .venv with $("$python" --version)."
  "$python" -m venv .venv
fi

stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "Installing requirements.txt into .venv (torch is large; this takes a few minutes)."
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  echo "$wanted" > "$stamp"
else
  echo "Reusing .venv: requirements.txt is unchanged since the last install."
fi
