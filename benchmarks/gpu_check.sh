#!/usr/bin/env bash
# The GPU check: what a first session on a GPU machine runs, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh             # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # prints the plan, runs every step small on the CPU
#   bash benchmarks/gpu_check.sh --dry-run pipeline   # only the named steps (any of the five below)
#
# Steps (each bounded by `timeout`; the script stops at the first failure and names it):
#   1 cuda       CUDA, cuDNN, NCCL and bf16 available (torch), the GPU's name and memory
#   2 tests      the tests whose ids name CUDA: pytest -k cuda (2026-11-30: test_precision's cuda
#                case only; no test is skipped on CPU yet, new CUDA-only tests join by name)
#   3 step       bf16 ResNet-50, 2 x 224 + 6 x 96 crops, batch 64: rayssl's Stepper (EMA teacher,
#                objective, schedules, non-finite guard) vs a plain PyTorch DINO step on the same
#                views; goal: ratio >= 0.90
#   4 pipeline   pretrain on one GPU from the photo set (benchmarks/photo_set.py, 1000 JPEGs),
#                data.decode_on=data: images/s and data_wait_fraction (the GPU's wait for input)
#   5 objective  the objective's share (prior mode) of step 3's ResNet-50 step at K = 65,536
#
# GPU_CHECK_OVERRIDES="a.b=c ..." adds dotted config overrides to every rayssl config (steps 3-5).
# Results: one line per step, "[gpu_check] <step>: ...", and $OUT (default $TMPDIR/gpu_check,
# /tmp/gpu_check without TMPDIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${OUT:-${TMPDIR:-/tmp}/gpu_check}"
DRY=0 ONLY=()
read -r -a OVR <<< "${GPU_CHECK_OVERRIDES:-}"
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    cuda|tests|step|pipeline|objective) ONLY+=("$arg") ;;
    *) echo "[gpu_check] unknown argument '$arg' (--dry-run, --help, step names: see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 GPU_CHECK_DRY=$DRY ROOT OUT

step() {  # step NAME SECONDS CMD...: run it (unless other steps are named), or say which step failed
  local name=$1 limit=$2; shift 2
  [[ ${#ONLY[@]} == 0 || " ${ONLY[*]} " == *" $name "* ]] || return 0
  echo "[gpu_check] $name: start (limit ${limit}s)"
  if ! timeout "$limit" "$@"; then echo "[gpu_check] $name: FAILED" >&2; exit 1; fi
}

if [[ $DRY == 1 ]]; then
  echo "[gpu_check] dry run: every step on the CPU with small shapes (convnet4, 28 px, K = 256)"
fi

step cuda 30 "$PY" - <<'EOF'
import os, torch
if os.environ["GPU_CHECK_DRY"] == "1":
    print(f"[gpu_check] cuda: torch {torch.__version__}, built for CUDA {torch.version.cuda}; "
          f"nccl module: {hasattr(torch.cuda, 'nccl')} (not checked on the CPU)")
else:
    assert torch.cuda.is_available(), "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    assert torch.cuda.is_bf16_supported(), "no bf16"
    print(f"[gpu_check] cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, NCCL {torch.cuda.nccl.version()}, "
          f"nccl backend {torch.distributed.is_nccl_available()}")
EOF

if [[ $DRY == 1 ]]; then
  step tests 90 "$PY" -m pytest -q --collect-only -k cuda "$ROOT/tests/test_precision.py"
else
  step tests 90 "$PY" -m pytest -q -rs -k cuda -p no:cacheprovider "$ROOT/tests"
fi

step step 90 "$PY" - "${OVR[@]}" <<'EOF'
"""rayssl's Stepper vs a plain PyTorch DINO step (student + EMA teacher, centred softmax CE,
AdamW) on the same in-memory views: images/s over timed steps after a warm-up."""
import os, sys, time
import torch
sys.path.insert(0, os.environ["ROOT"])
from rayssl.models import build_encoder, make_teacher
from rayssl.objective import ClusterObjective
from rayssl.schedules import build_schedules
from rayssl.train.step import Stepper, build_optimizer

sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
from gpu_check_shapes import setup
cfg, device, dry, views = setup(["train.precision=bf16", *sys.argv[1:]])
b, g, l, k = cfg.train.batch_size, cfg.augment.global_crop_size, cfg.augment.local_crop_size, cfg.objective.num_clusters
steps, warm = (3, 1) if dry else (30, 10)

def rate(one_step) -> float:
    for i in range(warm):
        one_step(i)
    if not dry: torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warm, steps):
        one_step(i)
    if not dry: torch.cuda.synchronize()
    return b * (steps - warm) / (time.perf_counter() - start)

def model():
    torch.manual_seed(0)
    return build_encoder(cfg.model, 3, g, k).to(device, memory_format=torch.channels_last)

student = model()
stepper = Stepper(student, make_teacher(student), ClusterObjective(cfg.objective),
                  build_optimizer(student, cfg.optim), build_schedules(cfg, 100, b), cfg, 100, device, True)
def rayssl_step(i):
    stepper.micro_batch(views, i, True)
    stepper.finish(i)

plain_s = model()
plain_t = make_teacher(plain_s)
opt = torch.optim.AdamW(plain_s.parameters(), lr=1e-4)
center = torch.zeros(k, device=device)
def plain_step(i):
    global center
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            t_logits = plain_t(views[:2])  # rayssl's Encoder takes the list of views
            t = torch.softmax((t_logits - center) / 0.04, -1).chunk(2)
        s = torch.log_softmax(plain_s(views) / 0.1, -1).chunk(len(views))
        loss = sum(-(ti * si).sum(-1).mean() for a, ti in enumerate(t) for c, si in enumerate(s) if a != c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(plain_t.parameters()), list(plain_s.parameters()), 0.004)
        center = 0.9 * center + 0.1 * t_logits.float().mean(0)

ours, plain = rate(rayssl_step), rate(plain_step)
print(f"[gpu_check] step: rayssl {ours:.0f} img/s, plain PyTorch {plain:.0f} img/s, ratio {ours / plain:.2f} "
      f"(goal >= 0.90; {cfg.model.backbone}, batch {b}, {g}/{l} px, K = {k}, bf16, {device})")
EOF

step pipeline 210 "$PY" - "${OVR[@]}" <<'EOF'
"""pretrain on one GPU from the photo set's shards, decode + multi-crop in Ray Data tasks."""
import os, statistics, sys, time
from pathlib import Path
root, out = Path(os.environ["ROOT"]), Path(os.environ["OUT"])
sys.path[:0] = [str(root), str(root / "benchmarks")]
from rayssl.config import load_config

cfg = load_config(root / "configs/imagenet_resnet50_gpu.yaml", [
    f"data.source={out}/photos-shards", "data.eval_source=null", "scaling.num_workers=1",
    "scaling.cpus_per_worker=4", "train.epochs=1", "train.steps_per_epoch=40", "train.log_every=10",
    "train.checkpoint_every=1000", "tracking.enabled=false", f"run.storage_path={out}/runs",
    f"run.name=gpu-check-{time.strftime('%H%M%S')}", *sys.argv[1:]])
if os.environ["GPU_CHECK_DRY"] == "1":
    print("[gpu_check] pipeline: config checked (the run itself needs the GPU)")
    sys.exit(0)
import photo_set
from rayssl.train.launch import pretrain

photo_set.make_shards(photo_set.make_folder(out / "photos", 1000, 3), f"{out}/photos-shards")
history = pretrain(cfg)["history"][1:]  # the first window holds start-up
rate = statistics.median(m["images_per_second"] for m in history)
wait = statistics.median(m["data_wait_fraction"] for m in history)
print(f"[gpu_check] pipeline: {rate:.0f} img/s, data_wait_fraction {wait:.2f} (ResNet-50, batch "
      f"{cfg.train.batch_size}, {cfg.scaling.cpus_per_worker:g} CPUs for the worker, the rest for Ray Data; "
      f"skipped {history[-1]['data/skipped_images']})")
EOF

step objective 60 "$PY" - "${OVR[@]}" <<'EOF'
"""The objective (targets + state update of prior mode) as a share of the whole step at K."""
import os, statistics, sys, time
import torch
sys.path.insert(0, os.environ["ROOT"])
from rayssl.models import build_encoder, make_teacher
from rayssl.objective import ClusterObjective
from rayssl.schedules import build_schedules
from rayssl.train.step import Stepper, build_optimizer

sys.path.insert(0, os.path.join(os.environ["ROOT"], "benchmarks"))
from gpu_check_shapes import setup
cfg, device, dry, views = setup(["objective.mode=prior", *sys.argv[1:]])
b, g, l, k = cfg.train.batch_size, cfg.augment.global_crop_size, cfg.augment.local_crop_size, cfg.objective.num_clusters
student = build_encoder(cfg.model, 3, g, k).to(device, memory_format=torch.channels_last)
objective = ClusterObjective(cfg.objective)
stepper = Stepper(student, make_teacher(student), objective, build_optimizer(student, cfg.optim),
                  build_schedules(cfg, 100, b), cfg, 100, device, not dry)

def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        if not dry: torch.cuda.synchronize()
        start = time.perf_counter(); fn()
        if not dry: torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return statistics.median(out)

def step():
    stepper.micro_batch(views, 10, True)
    stepper.finish(10)

step_s = timed(step, 3 if dry else 20)
logits = stepper.last_outputs[1]
objective_s = timed(lambda: objective.update_state([objective.targets(logits, 0.04).stat]), 3 if dry else 50)
print(f"[gpu_check] objective: K = {k}, {cfg.model.backbone}, batch {b}: step {1000 * step_s:.2f} ms, objective {1000 * objective_s:.2f} ms "
      f"= {objective_s / step_s:.1%} of the step ({device})")
EOF
echo "[gpu_check] ${ONLY[*]:-all steps} passed"
