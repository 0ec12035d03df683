#!/usr/bin/env bash
# Download the wheels the GPU machine's image lacks into .whl/ (git-ignored), for
# benchmarks/gpu_check.sh to install there with `pip install --no-index --no-deps --target`.
#
# The image (/work/.library/device/KINDS.md) has Python 3.12 with its own CUDA torch, numpy,
# packaging, pyyaml, pluggy, rich, psutil, tensorboard, tokenizers, safetensors, pytest and
# hypothesis; torch is never carried. It lacks megatron-core, pydantic (+ pydantic-core,
# annotated-types, typing-inspection), omegaconf, webdataset and braceexpand. pydantic-core
# needs typing-extensions >= 4.16, newer than the image may hold, so that travels too.
# The versions are the ones the CPU venv runs the test suite with. omegaconf 2.4 vendors
# its ANTLR runtime; an omegaconf that asks for antlr4-python3-runtime (2.3) gets a wheel
# of it built here, since PyPI has only its sdist.
#
# Usage (repo root, any machine with pip and PyPI): bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEST=.whl
WHEELS=(
  megatron-core==0.16.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  omegaconf==2.4.0
  webdataset==1.0.2
  braceexpand==0.1.7
)
# The device README's platform list: pip matches manylinux_2_N exactly; megatron-core's
# cp312 wheel is tagged manylinux_2_24/_2_28.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"

if unzip -p "$DEST"/omegaconf-*.whl '*/METADATA' | grep -q '^Requires-Dist: antlr4-python3-runtime'; then
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" 'antlr4-python3-runtime==4.9.*'
fi

# Every requirement of a carried wheel must be carried too or already be in the image.
IN_IMAGE='^(torch|numpy|packaging|pyyaml|typing-extensions)([^a-z0-9_.-]|$)'
missing=0
for wheel in "$DEST"/*.whl; do
  while read -r requirement; do
    name=$(echo "$requirement" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_.' 'a-z--')
    if ! ls "$DEST" | tr 'A-Z_' 'a-z-' | grep -q "^${name}-[0-9]" && ! echo "$name" | grep -Eq "$IN_IMAGE"; then
      echo "$(basename "$wheel") needs $name, which is neither carried nor in the image" >&2
      missing=1
    fi
  done < <(unzip -p "$wheel" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
done
[ "$missing" = 0 ] || exit 1

ls -l "$DEST"
du -sh "$DEST" | awk '{print "wheels: " $1 " in " $2 " (the device carries at most 64 MiB with the working tree)"}'
