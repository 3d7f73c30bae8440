#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks (its image has torch, torchvision, pandas, scikit-learn, pytest, ...
# but not fastai), downloaded here as wheels for its Python 3.12 into .whl/ (ignored by git), to carry there.
set -eu
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastai==2.8.12 fastcore==2.2.41 fastdownload==0.0.8 fastprogress==1.0.3 fasttransform==0.0.5 plum-dispatch==2.9.0 beartype
ls .whl
