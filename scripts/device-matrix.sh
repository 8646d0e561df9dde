#!/usr/bin/env bash
# Run the matrix on a lent GPU machine (Python 3.12 with its own CUDA torch, no engines installed).
#
#   scripts/device-matrix.sh probe      # a few CUDA cells: does the set-up work at all (about a minute)
#   scripts/device-matrix.sh large      # probe, a hung CUDA cell (its stack recorded), then dit-l (Flux width)
#   scripts/device-matrix.sh [full]     # phases in order of value, each stopped cleanly at the time budget
#   scripts/device-matrix.sh plan       # dry run: each phase's command and the cells it collects; nothing runs
#
# Engines travel as wheels in .whl/, the list in scripts/device-wheels.txt (docs/nightly-and-gpu.md, "On a lent GPU machine").
# Records and logs go to $OUT (results/ when unset): one results file per phase, one log for all. BUDGET_S (default
# 480) bounds the pytest phases together; a phase cut short by it records its running cell as interrupted, and later
# phases are skipped. The full run's phases, most valuable first: probe; Flux-sized cells without offload (diffusers
# stack, then direct); with model offload; SDXL; the other offload modes; the seed's and upstream's rules on CUDA;
# the rest of matrices/gpu.toml.
set -uo pipefail
export PYTHONUNBUFFERED=1
mode=${1:-full}
case $mode in probe|large|full|plan) ;; *) echo "usage: $0 [probe|large|full|plan]" >&2; exit 2 ;; esac
missing=$(grep -v '^#' scripts/device-wheels.txt | while read -r req; do
  [[ -z $req ]] && continue
  name=${req%%==*}; version=${req##*==}
  compgen -G ".whl/${name//-/_}-${version}-*.whl" >/dev/null || compgen -G ".whl/${name}-${version}-*.whl" >/dev/null \
    || echo "$req"
done)
[[ -n $missing ]] && echo "note: not in .whl/ (scripts/device-wheels.txt): $(echo $missing)"
if [[ $mode != plan ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-results}
mkdir -p "$OUT"
[[ $mode == plan ]] || python3 - <<'PY' | tee "$OUT/versions.txt"
import importlib.metadata as m, importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for d in ("accelerate", "safetensors", "bitsandbytes", "optimum-quanto", "gguf", "nncf", "sdnq", "torchao",
          "diffusers", "triton"):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, "missing")
PY
[[ $mode == plan ]] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
  | tee -a "$OUT/versions.txt"

# The harness is on PYTHONPATH there, not installed: its pytest11 entry point does not load the plugin, -p does.
plugin=()
python3 -c 'import importlib.metadata as m, sys
sys.exit(any(e.value == "harness.run.plugin" for e in m.entry_points(group="pytest11")))' && plugin=(-p harness.run.plugin)

deadline=$((SECONDS + ${BUDGET_S:-480}))
phase() {  # phase NAME PYTEST-ARGS...: one pytest run, its records in $OUT/NAME.jsonl
  local name=$1; shift
  if [[ $mode == plan ]]; then  # what it would run, and the cells pytest collects for it
    local cells
    cells=$(python3 -m pytest -m matrix --collect-only -q -p no:cacheprovider "${plugin[@]}" "$@" 2>&1 \
      | grep -Eo '^[0-9]+(/[0-9]+)? tests? (collected|selected)' | tail -n 1)
    echo "== $name: ${cells:-no cell collected}: pytest -m matrix $*"
    return
  fi
  local left=$((deadline - SECONDS))
  if ((left < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
  echo "== $name ($left s left): $*"
  local from=$(($(stat -c %s "$OUT/run.log" 2>/dev/null || echo 0) + 1))
  timeout -s INT -k 20 "$left" python3 -m pytest -m matrix -q -p no:cacheprovider "${plugin[@]}" --drift warn \
    --results "$OUT/$name.jsonl" --cell-timeout "${CELL_TIMEOUT_S:-90}" "$@" >>"$OUT/run.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - deadline + ${BUDGET_S:-480})) s"
  tail -c +"$from" "$OUT/run.log" | grep -E "^  [a-z-]+ +[0-9]+$|passed|failed|error" | tail -n 14
}

phase probe --matrix matrices/gpu.toml --device cuda --offload none --load post-load --model dit-s \
  --engine none,bnb,quanto,sdnq --qtype=-,nf4,qint8,int8
if [[ $mode == probe ]]; then tail -n 40 "$OUT/run.log"; exit 0; fi
if [[ $mode == large ]]; then
  # a cell made to hang on the GPU box: its record must carry the hung thread's Python stack
  cat > "$OUT/hang.toml" <<'TOML'
[axes]
engine = ["fault"]
qtype = ["hang"]
load = ["post-load"]
offload = ["none"]
device = ["cuda"]
model = ["dit-xs"]
dtype = ["float32"]
[settings]
cell_timeout_s = 8
TOML
  CELL_TIMEOUT_S=8 phase hang --matrix "$OUT/hang.toml"
  CELL_TIMEOUT_S=600 phase large --matrix matrices/gpu-large.toml --device cuda
  tail -n 60 "$OUT/run.log"; exit 0
fi
# 1. Flux-sized cells without offload: what users choose an engine for (memory, speed), and the published claims;
#    the diffusers stack (what users run) before the direct one (its control)
export CELL_TIMEOUT_S=${CELL_TIMEOUT_S:-900}
phase flux-none --matrix matrices/published.toml --device cuda --model flux-dev --offload none --stack diffusers
phase flux-none-direct --matrix matrices/published.toml --device cuda --model flux-dev --offload none --stack direct
# 2. with model offload, the mode most users with less memory than the model pick
phase flux-model --matrix matrices/published.toml --device cuda --model flux-dev --offload model
# 3. SDXL's UNet, no offload and model offload
phase sdxl --matrix matrices/published.toml --device cuda --model sdxl --offload none,model
# 4. the other offload modes for the baseline and two engines (peak memory must order none > model > group,
#    balanced > sequential)
phase flux-offload --matrix matrices/published.toml --device cuda --offload sequential,group,balanced
export CELL_TIMEOUT_S=90
# 5. the seed's documented behaviour (written for NVIDIA GPUs) and the incompatibilities reported upstream, on CUDA
phase sdnext --matrix matrices/sdnext.toml --device cuda
phase upstream --matrix matrices/upstream.toml --device cuda
# 6. the rest: every engine and type on realistic shapes in bfloat16, then the offload modes, then larger shapes
phase gpu-none --matrix matrices/gpu.toml --device cuda --model dit-s --offload none
phase gpu-offload --matrix matrices/gpu.toml --device cuda --model dit-s --offload model,sequential,balanced
phase gpu-large --matrix matrices/gpu.toml --device cuda --model dit-m,unet-s --offload none --load post-load
