#!/usr/bin/env bash
# Fetch (here, where pip reaches a registry) the wheels that gpu_check.sh needs on the GPU machine
# and that its image lacks (it has torch, torchvision, numpy, scipy, pandas, pyarrow, pillow,
# psutil, nvidia-ml-py, pyyaml, requests, ...; /work/.library/device/KINDS.md): MLflow and what
# it imports, at requirements.lock's versions, for its Python 3.12 on x86-64. Into .whl/ (git
# ignores it); the device run carries .whl and installs them with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
NAMES="alembic annotated-types blinker cachetools cffi cryptography databricks-sdk docker fastapi
Flask Flask-WTF flask-cors gitdb GitPython google-auth graphene graphql-core graphql-relay gunicorn
huey importlib_metadata itsdangerous Mako mlflow mlflow-skinny mlflow-tracing opentelemetry-api
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions platformdirs prettytable
pyasn1 pyasn1_modules pycparser pydantic pydantic_core python-dotenv skops smmap SQLAlchemy sqlparse
starlette torchinfo typing-inspection uvicorn wcwidth WTForms"
pins=()
for name in $NAMES; do
    pin=$(grep -i -E "^${name}==" requirements.lock) || { echo "no pin for $name in requirements.lock" >&2; exit 1; }
    pins+=("$pin")
done
mkdir -p .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    -d .whl "${pins[@]}"
du -sh .whl
