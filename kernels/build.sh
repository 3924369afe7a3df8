#!/usr/bin/env bash
# Build the optional CPU kernels (cosyvoice2_kernels) and install them into the
# Python environment that runs cosyvoice2-mlx.
#
#   kernels/build.sh            # uses `python` (an activated venv), or $PYTHON
#
# Without a C++ compiler or CMake (or on Apple silicon, where Metal needs no kernels)
# it prints one line and exits 0: cosyvoice2-mlx runs without the extension. A build
# that starts and fails exits non-zero.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
NANOBIND="nanobind==3.0.1"  # the release MLX 0.32.4 was built with (see pyproject.toml)

skip() {
  echo "cosyvoice2_kernels: $1; skipping the optional CPU kernels (cosyvoice2-mlx runs without them)"
  exit 0
}

"$py" -c "import mlx.core" >/dev/null 2>&1 || skip "MLX is not importable by $py"
if [ "$(uname -s)" = "Darwin" ] && [ "$(uname -m)" = "arm64" ]; then
  skip "Apple silicon runs the model on Metal"
fi
if [ -n "${CXX:-}" ]; then
  command -v "${CXX%% *}" >/dev/null 2>&1 || skip "CXX=$CXX not found"
elif ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
  && ! command -v clang++ >/dev/null 2>&1; then
  skip "no C++ compiler found"
fi
if ! command -v cmake >/dev/null 2>&1 && ! "$py" -c "import cmake" >/dev/null 2>&1; then
  skip "no CMake found"
fi

"$py" -m pip install -q "scikit-build-core>=0.10" "$NANOBIND"
"$py" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$here"
"$py" -c "import cosyvoice2_kernels as k; print(f'cosyvoice2_kernels: built for MLX {k.BUILD_INFO[\"mlx_version\"]}, using {k.isa()} ({\", \".join(k.available_isas())} available), {k.num_threads()} threads')"
