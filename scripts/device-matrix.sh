#!/usr/bin/env bash
# Run the GPU matrix on a lent accelerator machine (Python 3.12 with its own CUDA torch, no engines installed).
# Engines travel as wheels in .whl/ (see README, "On a lent GPU machine"); records go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results}
mkdir -p "$OUT"
python3 - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for d in ("accelerate", "safetensors", "bitsandbytes", "optimum-quanto", "gguf", "nncf", "sdnq", "torchao"):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, "missing")
PY
set -o pipefail
python3 -m pytest -m matrix --matrix "${MATRIX:-matrices/gpu.toml}" --results "$OUT/cuda.jsonl" -v -p no:cacheprovider \
  --drift warn "$@" 2>&1 | tee "$OUT/pytest.log"
