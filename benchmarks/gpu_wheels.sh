#!/usr/bin/env bash
# The wheels keel needs on the GPU machine beyond ../shared/gpu/wheelhouse.sh's list (Python 3.12, no network
# there): safetensors (keel export / import, `keel generate HF_DIR`) and pytest-xdist with execnet (the test
# runner's two workers; pyproject's addopts ask for them). Run from the project root after wheelhouse.sh.
set -euo pipefail
dir=${1:-.gpu-wheels}
mkdir -p "$dir"
pins=()
for p in safetensors pytest-xdist execnet; do
  v=$(grep -i "^$p==" constraints.txt | head -1 || true); [ -n "$v" ] && pins+=("$v") || pins+=("$p")
done
pip download -q --python-version 3.12 --only-binary=:all: --no-deps \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
du -sh "$dir"
