#!/usr/bin/env bash
# Set up hfmi_kit on an HPC system with environment modules (Lmod/Tcl modules).
#
#   source environments/hpc_setup.sh          # load modules, create/activate the venv
#   HFMI_CUDA=0 source environments/hpc_setup.sh   # CPU-only partition
#
# Override the module names for your site:
#   HFMI_PYTHON_MODULE (default python/3.11), HFMI_CUDA_MODULE (default cuda/12.6),
#   HFMI_VENV (default <repo>/.venv), HFMI_TORCH_SPEC (default "torch>=2.3" with CUDA,
#   "torch==2.13.0" from the CPU wheel index without).
# The script registers a Jupyter kernel "hfmi_kit" so the HPC portal's JupyterLab finds it.
set -eo pipefail
HFMI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HFMI_VENV="${HFMI_VENV:-$HFMI_ROOT/.venv}"
HFMI_CUDA="${HFMI_CUDA:-1}"

if command -v module >/dev/null 2>&1; then
  module load "${HFMI_PYTHON_MODULE:-python/3.11}" || echo "hpc_setup: could not load ${HFMI_PYTHON_MODULE:-python/3.11}" >&2
  if [ "$HFMI_CUDA" = "1" ]; then
    module load "${HFMI_CUDA_MODULE:-cuda/12.6}" || echo "hpc_setup: could not load ${HFMI_CUDA_MODULE:-cuda/12.6}" >&2
  fi
else
  echo "hpc_setup: no 'module' command; using $(command -v python3)" >&2
fi

if [ ! -x "$HFMI_VENV/bin/python" ]; then
  python3 -m venv "$HFMI_VENV"
  "$HFMI_VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$HFMI_CUDA" = "1" ]; then
    "$HFMI_VENV/bin/python" -m pip install -q "${HFMI_TORCH_SPEC:-torch>=2.3}"
  else
    "$HFMI_VENV/bin/python" -m pip install -q --extra-index-url https://download.pytorch.org/whl/cpu \
      "${HFMI_TORCH_SPEC:-torch==2.13.0}"
  fi
  "$HFMI_VENV/bin/python" -m pip install -q -e "$HFMI_ROOT[all]"
  "$HFMI_VENV/bin/python" -m ipykernel install --user --name hfmi_kit --display-name "hfmi_kit (${HFMI_VENV})"
fi
# shellcheck disable=SC1091
source "$HFMI_VENV/bin/activate"
# Threads: one OpenMP thread pool per rank, sized to the CPUs SLURM gave this task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-4}}"
echo "hfmi_kit ready: $(python -c 'import hfmi_kit, torch; print(hfmi_kit.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
