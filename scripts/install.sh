#!/usr/bin/env bash
# Create .venv at the repository root and install hfmi_kit into it.
#   bash scripts/install.sh        # everything a user needs: hfmi_kit[all] (every domain, viz, JupyterLab, explain)
#   bash scripts/install.sh dev    # ... plus the test tools
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0 used on
# laptops and CI; on a GPU node use e.g. TORCH_SPEC="torch>=2.3" or environments/hpc_setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
extras="all"
if [ "${1:-}" = "dev" ]; then
  extras="$extras,dev"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${extras}]"
echo "installed: $(.venv/bin/python -c 'import hfmi_kit, torch; print("hfmi_kit", hfmi_kit.__version__, "torch", torch.__version__)')"
