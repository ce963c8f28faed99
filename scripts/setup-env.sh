# Sourced by demo.sh and test.sh: creates (once) and activates .venv with dlf installed
# (DLF_INSTALL: what pip installs, default the package alone).
# torch is pinned here, not in the package: 2.13.0 is the local CPU build; users bring their own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
# The demo installs dlf alone; test.sh asks for the test extra (which builds llama.cpp once).
python -m pip install -q -e "${DLF_INSTALL:-.}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The toy models are tiny: one thread each avoids oversubscribing small machines.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
