#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks into .whl/ (git-ignored), for
# benchmarks/gpu_check.sh to install offline there. Target: the device image's Python 3.12 on x86-64 Linux, which
# already holds torch, torchvision, timm, numpy, scipy, matplotlib, opencv, rich, tensorboard, pytest and the
# like (/work/.library/device/KINDS.md). Versions: those of this project's set-up (nerfstudio 1.1.5's imports).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PKGS=(
  nerfstudio==1.1.5 nerfacc==0.5.2 gsplat==1.4.0 timm==1.0.31 tyro==1.0.17 docstring_parser==0.18.0
  typeguard==4.6.1 viser==0.2.7 websockets==17.4 msgspec==0.23.0 wandb==0.25.0 pydantic==2.14.4
  pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 appdirs==1.4.4 defusedxml==0.7.1
  dill==0.4.1 multiprocess==0.70.19 pathos==0.3.5 ppft==1.7.8 fpsample==0.3.3 pyquaternion==0.9.9
  pytorch-msssim==1.0.0 rawpy==0.28.0 splines==0.3.0 tensorly==0.10.0 torch_fidelity==0.4.0 truststore==0.10.5
  PySocks==1.7.1 platformdirs
)
mkdir -p .whl
for pkg in "${PKGS[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg" \
    || echo "gpu_wheels: no wheel for $pkg (see /work/.library/device/README.md on other manylinux tags)"
done
du -sh .whl
echo "carry .whl in the device run (64 MiB limit for the whole working tree)"
