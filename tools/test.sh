#!/usr/bin/env bash
# All of flatmin's tests, as the README's test command and CI (.ci/run) run them:
#   1. the Rust workspace (`cargo test --workspace`);
#   2. the Python package: a fresh virtual environment (target/python-test-venv, or
#      $FLATMIN_PY_VENV) gets numpy, safetensors and pytest from PyPI and `pip install ./python`
#      (maturin, from PyPI, builds the extension), then pytest runs python/tests. Tests that
#      need torch are skipped with a visible line when torch is not installed there.
# Needs: Rust (cargo), python3 with venv and pip, and access to crates.io and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace

venv="${FLATMIN_PY_VENV:-target/python-test-venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy safetensors pytest
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ./python
"$venv/bin/python" -m pytest python/tests -q -rs
