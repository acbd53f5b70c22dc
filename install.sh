#!/usr/bin/env bash
# Create .venv and install cliptime with its test tools.
#
# torch and torchvision are installed first as a pinned pair: on the project's CPU machines pip takes this pair
# from local disk, and PyPI's newest torchvision does not import beside an older CPU torch. On a GPU machine
# with internet the same pins give the CUDA build. Everything else comes from pyproject.toml, held to the versions
# in constraints.txt (the ones the test suite last passed with), so a new release on the index cannot break a
# fresh install.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -c constraints.txt -e '.[dev]'
python -c "import cliptime, torch, ray, mlflow, open_clip; print('cliptime installed: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
