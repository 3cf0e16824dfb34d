#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install megamm into it.
# Source it: `source tools/setup_env.sh`; afterwards the venv is active.
#   MEGAMM_VENV        venv location (default: <repo>/.venv)
#   MEGAMM_TORCH_SPEC  torch requirement installed first when torch is missing
#                      (default torch==2.13.0; on a GPU cluster pick the CUDA build you want)
set -euo pipefail
_megamm_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_megamm_venv=${MEGAMM_VENV:-$_megamm_root/.venv}
if [ ! -x "$_megamm_venv/bin/python" ]; then
  echo "creating virtual environment $_megamm_venv"
  "${PYTHON:-python3}" -m venv "$_megamm_venv"
fi
# shellcheck disable=SC1091
source "$_megamm_venv/bin/activate"
_megamm_stamp="$_megamm_venv/.megamm-install-$(sha1sum "$_megamm_root/setup.py" | cut -c1-12)"
if [ ! -f "$_megamm_stamp" ]; then
  echo "installing megamm and its dependencies into $_megamm_venv"
  python -m pip install --quiet --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "${MEGAMM_TORCH_SPEC:-torch==2.13.0}"
  fi
  python -m pip install --quiet -e "$_megamm_root[dev]"
  touch "$_megamm_stamp"
fi
# One DeepSpeed op cache per venv: another venv would rebuild the shared one (minutes) and
# could leave its build lock behind. A lock older than 15 minutes is a killed build's leftover
# (a build takes 1-5 minutes), and would make every later start wait forever.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$_megamm_venv/torch_extensions}
find "$TORCH_EXTENSIONS_DIR" -maxdepth 3 -name lock -mmin +15 -print -delete 2>/dev/null \
  | sed 's/^/removed a stale DeepSpeed op build lock: /' || true
