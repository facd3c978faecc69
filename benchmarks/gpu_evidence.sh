#!/usr/bin/env bash
# medssm's GPU evidence in one call of under 9 minutes, on a fresh device machine that cannot reach
# the network (one H100 or H200; PyTorch, Triton and numba in its python3; see
# /work/.library/device/KINDS.md). Steps, in this order, each in its own process with its own time
# limit, so that one failing or running out of time keeps the others' results:
#
#   0. setup (limit 60 s): GPU and package versions; MONAI, nibabel and SimpleITK installed from the
#      wheels in benchmarks/wheels/ where python3 lacks them (nothing is downloaded).
#   1. gpu      (120 s): benchmarks/gpu.sh as it stands: the Triton scan beside `chunked`, LightM-UNet
#                        and SegResNet-32 training steps and forwards, 2D and 3D, fp32 and bf16.
#      bandwidth (45 s): benchmarks/scan_bandwidth.py: the Triton scan's effective memory bandwidth at
#                        (batch, D, L, N) = (2, 1536, 4096, 16) and (8, 768, 16384, 16), forward and
#                        forward + backward, against a measured copy and the datasheet peak.
#   2. 3d        (90 s): benchmarks/step_3d.py: SegMamba at 128³ (4 channels in, 4 classes, batch 2,
#                        Dice + CE, AdamW, bf16), training-step time and peak memory, without and with
#                        checkpointing (`checkpointing=True` where medssm's constructor takes it, else
#                        "n/a"), beside MONAI SwinUNETR-48 (use_checkpoint off and on) and SegResNet-32.
#   3. lung (the rest, up to the 530 s mark): benchmarks/lung_budget.py: `medssm train --model
#      lightm_unet_2d --budget 5m --device cuda --precision bf16` at the full 256² (--target-spacing 1 1
#      --patch-size 256 256) on Dataset001_LungXray, `medssm predict` of fold 0's held-out cases,
#      `medssm evaluate`: Dice against the target 0.962 (LightM-UNet's paper: 96.17). The budget is
#      cut to what is left when the earlier steps took long; monai:UNet follows at the same budget
#      only if that still fits (it does not, within 9 minutes, after a 5-minute LightM-UNet run).
#
# With the device tool (the `run` verb), from the checkout the tool sends (the session's own
# checkout: a helper's worktree does not travel):
#   1. here, once: `bash benchmarks/gpu_prepare.sh` fills the ignored benchmarks/wheels/ (MONAI,
#      nibabel, SimpleITK repacked small) and benchmarks/gpu_data/ (the lung set, 17 MB: ../shared
#      beside the checkout does not travel); a call then sends about 52 MiB of the 64 allowed.
#   2. run: command `bash benchmarks/gpu_evidence.sh "$OUT"`, carry ["benchmarks/wheels",
#      "benchmarks/gpu_data"], timeout_s 600 (the script stops itself at 530 s). Give the machine
#      back afterwards unless rerunning at once (e.g. `--steps lung`).
#   3. what comes back (8 files, the tool's most): evidence.log (everything printed), summary.txt
#      (the short tables, also printed last), env.txt (GPU, versions, installs), gpu.json (gpu.sh's),
#      scan_bandwidth.json, step_3d.json, lung.json, lung_runs.tar.gz (each run's plan, budget, log,
#      splits and evaluation; no weights). Runs and predictions stay in $TMPDIR/medssm-evidence.
#
# Options: OUTDIR (default $OUT, else benchmarks/results/gpu_evidence); --tiny: every step at tiny
# sizes (on a machine without a GPU: Triton's interpreter for the scans, the CPU for the rest, tiny
# models, 30 s budgets and 8 held-out cases; longer step limits), a check of this script;
# --steps gpu,bandwidth,3d,lung (any subset; setup always runs); --budget SECONDS (the lung runs',
# default 300; tiny 30); --models M1,M2 (default lightm_unet_2d,monai:UNet); --seconds S (the
# deadline, default 530; tiny 1500). Data: $MEDSSM_DATA if it holds Dataset001_LungXray, else
# benchmarks/gpu_data/. On a CPU machine, with the project's virtualenv first on PATH (about 10
# minutes on two busy cores):
#   PATH=/work/main/.venv/bin:$PATH bash benchmarks/gpu_evidence.sh --tiny /tmp/evidence-tiny
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

out="" tiny=0 steps="gpu,bandwidth,3d,lung" budget="" models="lightm_unet_2d,monai:UNet" total=""
while (($#)); do
    case $1 in
        --tiny) tiny=1 ;;
        --steps) steps=$2; shift ;;
        --steps=*) steps=${1#*=} ;;
        --budget) budget=$2; shift ;;
        --budget=*) budget=${1#*=} ;;
        --models) models=$2; shift ;;
        --models=*) models=${1#*=} ;;
        --seconds) total=$2; shift ;;
        --seconds=*) total=${1#*=} ;;
        -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
out=${out:-${OUT:-benchmarks/results/gpu_evidence}}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
total=${total:-$((tiny ? 1500 : 530))}
budget=${budget:-$((tiny ? 30 : 300))}
limit_for() { echo $((tiny ? $2 : $1)); }  # a step's limit: limit_for FULL TINY (the interpreter and a CPU are slow)
work=${TMPDIR:-/tmp}/medssm-evidence
site=${TMPDIR:-/tmp}/medssm-gpu-site  # the folder gpu.sh installs into too
tiny_flag=() && ((tiny)) && tiny_flag=(--tiny)
export PYTHONUNBUFFERED=1

declare -A status
t0=$SECONDS

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds (less if the deadline is nearer).
step() {
    local name=$1 cap=$2
    shift 2
    if [[ ",$steps," != *",$name,"* ]]; then
        status[$name]="not asked for"
        return
    fi
    local left=$((total - (SECONDS - t0) - 10))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        status[$name]="skipped: ${left} s left"
        echo "== $name: skipped, ${left} s left before the deadline"
        return
    fi
    echo
    echo "== $name (limit ${limit} s, at $((SECONDS - t0)) s): $*"
    local began=$SECONDS code
    timeout -k 10 "$limit" "$@"
    code=$?
    local took=$((SECONDS - began))
    case $code in
        0) status[$name]="ok, ${took} s" ;;
        124 | 137) status[$name]="TIMED OUT at its ${limit} s limit (results so far kept)" ;;
        *) status[$name]="FAILED, exit ${code}, after ${took} s" ;;
    esac
    echo "== $name: ${status[$name]}"
}

setup() {
    echo "date: $(date -u +%FT%TZ); host: $(hostname); $(nproc) CPUs; tiny: $tiny"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "no nvidia-smi"
    nvidia-smi 2>/dev/null || true
    # the packages medssm needs that may be missing, installed from the carried wheels
    local missing=() module wheel
    for module in monai:monai nibabel:nibabel SimpleITK:simpleitk; do
        if ! python3 -c "import ${module%%:*}" 2>/dev/null; then
            wheel=$(compgen -G "benchmarks/wheels/${module#*:}-*.whl" | head -1)
            if [[ -n $wheel ]]; then missing+=("$wheel"); else echo "missing ${module%%:*}, and no wheel for it in benchmarks/wheels/"; fi
        fi
    done
    if ((${#missing[@]})); then
        echo "installing into $site: ${missing[*]}"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${missing[@]}" || return 1
    fi
    python3 - <<'PY'
import importlib, importlib.metadata as md, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
for name in ("torch", "triton", "numba", "numpy", "scipy", "monai", "nibabel", "SimpleITK", "safetensors"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', None) or md.version(name)} ({module.__file__})")
    except Exception as e:
        print(f"{name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda: {torch.cuda.get_device_name()}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, torch CUDA {torch.version.cuda}")
else:
    print("cuda: not available")
import medssm
from medssm.ssm import available_backends
print(f"medssm {medssm.__version__} from {medssm.__file__}; scan backends: {', '.join(available_backends())}")
PY
}

summarise() {
    python3 - "$out" "$tiny" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
gpu = load("gpu.json")
if gpu:
    print("\ngpu.sh: scan (fp32), ms            triton fwd  triton f+b   chunked fwd  chunked f+b")
    for r in gpu["scan"]:
        t, c = r.get("triton") or {}, r.get("chunked") or {}
        cells = [t.get("forward_ms"), t.get("forward_backward_ms"), c.get("forward_ms"), c.get("forward_backward_ms")]
        print(f"  {str(tuple(r['shape'])):<30}" + "".join(f"{v:>12.2f}" if v is not None else f"{'-':>12}" for v in cells))
    print("gpu.sh: models                   fp32 step   fp32 fwd   bf16 step   bf16 fwd  (ms)")
    for r in gpu["models"]:
        if "error" in r:
            print(f"  {r['model']:<30}{r['error'][:60]}")
        else:
            print(f"  {r['model']:<30}" + "".join(f"{r[p][k]:>11.1f}" for p in ("fp32", "bf16") for k in ("train_step_ms", "forward_ms")))
bw = load("scan_bandwidth.json")
if bw:
    peaks = ", ".join(f"{k.split('_')[0]} {bw[k]:.2f} TB/s" for k in ("copy_tbs", "datasheet_tbs") if bw.get(k))
    print(f"\nscan bandwidth (Triton, fp32; peak: {peaks or 'none'})")
    for r in bw["rows"]:
        for p in ("forward", "fwd+bwd"):
            if p in r:
                c = r[p]
                fr = " ".join(f"{100 * v:.1f}% of {k.split('_')[-1]}" for k, v in c.items() if k.startswith("fraction_of_"))
                print(f"  {str(tuple(r['shape'])):<24}{p:<9}{c['ms']:>9.3f} ms {c['effective_tbs']:>7.3f} TB/s  {fr}")
        if "error" in r:
            print(f"  {str(tuple(r['shape'])):<24}{r['error']}")
s3 = load("step_3d.json")
if s3:
    print(f"\n3D training step at {tuple(s3['input'])}, {s3['precision']}:        step ms   peak GiB")
    for r in s3["rows"]:
        ck = r["checkpointing"]
        label = f"{r['model']} ({'ckpt ' + str(ck) if isinstance(ck, bool) else ck})"
        if r.get("input", s3["input"]) != s3["input"]:
            label += f" at {tuple(r['input'][2:])}"
        if "step_ms" in r:
            peak = f"{r['peak_allocated_gib']:>10.2f}" if "peak_allocated_gib" in r else f"{'-':>10}"
            print(f"  {label:<46}{r['step_ms']:>9.1f}{peak}")
        else:
            print(f"  {label:<46}{r.get('error') or r.get('note')}")
lung = load("lung.json")
if lung:
    print(f"\nlung X-rays, held-out fold 0 (target Dice >= {lung['target_dice']}):")
    for m in lung["models"]:
        if "dice" in m:
            plan = m.get("budget_plan") or {}
            print(f"  {m['model']:<22} Dice {m['dice']:.4f} ({'met' if m['meets_target'] else 'NOT met'}), "
                  f"IoU {m['iou']:.4f}, HD95 {m['hd95']:.2f}; budget {m['budget_s']} s, {m.get('epochs_run', '?')} epochs, "
                  f"run {m['seconds']:.0f} s")
        else:
            print(f"  {m['model']:<22} {m.get('skipped') or m.get('error') or 'no result'}")
if sys.argv[2] == "1":
    print("\n(tiny sizes: a check of the script, not measurements)")
PY
}

main() {
    rm -rf "$work" && mkdir -p "$work"  # a warm machine's earlier runs would stop medssm train
    echo "medssm GPU evidence -> $out (deadline ${total} s; steps ${steps})"
    export PYTHONPATH="$root/src:$site${PYTHONPATH:+:$PYTHONPATH}" site tiny
    export -f setup
    steps+=,setup
    step setup 60 bash -o pipefail -c 'setup 2>&1 | tee "$1"' _ "$out/env.txt"
    step gpu "$(limit_for 120 420)" bash benchmarks/gpu.sh "${tiny_flag[@]}" --json "$out/gpu.json"
    if ((tiny)) && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        step bandwidth 240 env TRITON_INTERPRET=1 python3 benchmarks/scan_bandwidth.py --tiny --json "$out/scan_bandwidth.json"
    else
        step bandwidth 45 python3 benchmarks/scan_bandwidth.py "${tiny_flag[@]}" --json "$out/scan_bandwidth.json"
    fi
    step 3d "$(limit_for 90 300)" python3 benchmarks/step_3d.py "${tiny_flag[@]}" --repeats $((tiny ? 1 : 3)) --json "$out/step_3d.json"
    local data=${MEDSSM_DATA:-}/Dataset001_LungXray
    [[ -n ${MEDSSM_DATA:-} && -d $data ]] || data=$root/benchmarks/gpu_data/Dataset001_LungXray
    local left=$((total - (SECONDS - t0) - 15))
    step lung "$left" python3 benchmarks/lung_budget.py -d "$data" --work "$work" --models "$models" \
        --budget "$budget" --seconds "$((left - 10))" "${tiny_flag[@]}" --json "$out/lung.json" \
        --archive "$out/lung_runs.tar.gz"
    {
        echo "medssm GPU evidence, $(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no GPU)"
        echo "total $((SECONDS - t0)) s of the ${total} s allowed"
        local name
        for name in setup gpu bandwidth 3d lung; do printf '  %-10s %s\n' "$name" "${status[$name]:-not run}"; done
        summarise
    } > "$out/summary.txt" 2>&1
    echo
    cat "$out/summary.txt"
    [[ "${status[*]}" != *FAILED* && "${status[*]}" != *"TIMED OUT"* ]]  # the exit status: 0 when every step ran through
}

main 2>&1 | tee "$out/evidence.log"
