#!/usr/bin/env bash
# A GPU session's checks in one call, on a machine with torch, CUDA, transformers and timm but not Ray or
# Prefect (the device tool's): the CUDA tests of vlp_core, a training through pipelines.training.loop, then
# `bench training`, `scoring` and `caption` at their GPU sizes, then a profile of a caption call and a
# pretraining step (benchmarks/gpu_profile.py). Logs and JSON reports go to $OUT (default /tmp/gpu-check).
#
# The packages such a machine lacks travel as wheels in .whl/ (ignored by git). Here, once:
#   echo /.whl/ >> .git/info/exclude
#   make gpu-wheels
# then, through the device tool: run with carry [".whl"] and command `bash benchmarks/gpu_check.sh`.
# GPU_CHECK_QUICK=1 runs the benchmarks at their quick sizes (a dry run, e.g. on a CPU).
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
    export PYTHONPATH="$PWD"
fi
python3 -c "import torch; print('torch', torch.__version__, 'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
python3 -m pytest -q -p no:cacheprovider -o addopts= tests/vlp_core/test_devices.py tests/vlp_core/test_blip.py \
    2>&1 | tee "$OUT/tests.log"
# A training that runs in this process (one worker, no Ray Train) on the GPU: 20 pretraining steps of the tiny
# preset through pipelines.training.loop, whose batches the loader makes on the CPU.
timeout 300 python3 - <<'PY' 2>&1 | tee "$OUT/train_loop.log"
import json, tempfile
from pathlib import Path
import torch
from pipelines.training.config import TrainConfig
from pipelines.training.data import coco_triples, write_pairs
from pipelines.training.loop import SUMMARY_FILE, Placement, TrainSpec, train_loop
from pipelines.world.generate import WorldConfig, make_world
from vlp_core.tokenizer import train_tokenizer

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
root = Path(tempfile.mkdtemp())
world = make_world(root / "world", WorldConfig(seed=0, n_web=10, n_human=64, n_test=4))
pairs = write_pairs(coco_triples(world.human_annotations, world.human_root), root / "run" / "pairs.arrow", "human set")
train_tokenizer(pairs.captions(), vocab_size=256).save_pretrained(root / "tokenizer")
config = TrainConfig(preset="tiny", max_steps=20, batch_size=32, lr=1e-3, executor="local", use_gpu=device.type == "cuda")
steps_per_epoch = len(pairs) // config.batch_size
spec = TrainSpec("pretrain", config, root / "run", pairs, world.human_root, root / "tokenizer", steps_per_epoch, config.max_steps)
train_loop(spec, Placement(device=device))
history = json.loads((root / "run" / "final" / SUMMARY_FILE).read_text())["history"]
print(f"train_loop on {device}: {len(history)} steps, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
PY
quick="${GPU_CHECK_QUICK:+True}"
for name in training scoring caption; do
    timeout 300 python3 -c "
from benchmarks.$name import run
from pathlib import Path
from benchmarks.harness import save_reports
report = run(quick=${quick:-False})
print(report.text())
save_reports([report], Path('$OUT/$name.json'))
" 2>&1 | tee "$OUT/$name.log"
done
# Where the GPU's time goes in a caption call and a pretraining step: what to speed up next.
timeout 240 python3 -m benchmarks.gpu_profile ${GPU_CHECK_QUICK:+--quick} 2>&1 | tee "$OUT/profile.log"
