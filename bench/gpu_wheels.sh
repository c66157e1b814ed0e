#!/usr/bin/env bash
# What `bench/gpu.py` (default `--via trials`) needs on a GPU machine that has Python 3.12, JAX (CUDA) and
# torch but neither Keras nor pydantic, and no internet: the missing wheels and MNIST, laid into
# .gpu-bench/ (git-ignored here). Run here, once; then on the GPU machine, carrying .gpu-bench:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-bench/wheels/*.whl \
#     && PYTHONPATH=/tmp/site KERAS_BACKEND=jax MNIST_SWEEP_DATA=.gpu-bench/mnist PYTHONUNBUFFERED=1 \
#        python3 bench/gpu.py && cp bench/RESULTS.md "$OUT/"
#
# The versions are those of this checkout's environment, so the GPU runs the same Keras as the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MNIST=${MNIST_SWEEP_DATA:-../shared/data/mnist}
folder=.gpu-bench
exclude=$(git rev-parse --git-path info/exclude)
grep -qx "/$folder/" "$exclude" 2>/dev/null || echo "/$folder/" >>"$exclude"
mkdir -p "$folder/wheels" "$folder/mnist"
pins=$("$PYTHON" -c '
from importlib.metadata import version
names = ["keras", "namex", "optree", "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
print(" ".join(f"{n}=={version(n)}" for n in names))')
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086  # $pins is a list of requirements
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d "$folder/wheels" $pins
cp "$MNIST"/*-ubyte* "$folder/mnist/"
du -sh "$folder"
