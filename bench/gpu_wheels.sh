#!/usr/bin/env bash
# Wheels that bench/gpu_train.py needs on a CUDA machine whose Python (3.12) already has torch, timm, numpy,
# opencv, pandas, scikit-learn, safetensors, click and tqdm but not albumentations: downloaded into .whl/
# (git-ignored) for machines that cannot reach a package index. Versions: those this project's own
# environment resolved.
#
# On the CUDA machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_train.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16
ls -l .whl
