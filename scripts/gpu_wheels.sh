#!/usr/bin/env bash
# Download, on a machine with network, the Python 3.12 manylinux wheels of the dependencies the
# lent GPU machines lack (grain, pydantic, tensorboardX, jinja2 and what they need beyond that
# image; pyarrow, ~40 MB, is left out: only parquet/arrow/hf_dataset sources import it)
# into .whl/ (git-ignored; pydantic and pydantic-core are pinned as a pair: pydantic needs that
# exact core); scripts/gpu_check.sh installs them there. ~7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # one version of each package: two stop the install on the GPU machine
platforms=()
for p in manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
  manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  grain array-record portpicker pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  typing-extensions tensorboardX jinja2 markupsafe
ls .whl
