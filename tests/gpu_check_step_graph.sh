#!/usr/bin/env bash
# GPU check of --cuda-graph (train_tokenizer.py, train_ar.py), run from the repo root on a CUDA machine:
#     FASHION_MNIST_DIR=/path/to/fmnist OUT=/tmp/out bash tests/gpu_check_step_graph.sh
# Writes $OUT/summary.txt (equality and speed), $OUT/pytest.txt and $OUT/logs.txt (the runs' log tails).
#  1. equality, both trainers at batch 512 with --compile, 30 steps from seed 0: eager twice (the noise floor of
#     the eager step itself), graphed, and graphed for 15 steps then resumed (the resumed run warms up again).
#     The lr is a power of two (2^-12) so that the graphed AdamW's float32 lr tensor holds it exactly; the AR model
#     keeps GPT-fmnist's dropout 0.1 (replays must draw the eager masks) and an EMA.
#  2. speed: STEPS (200) steps at batch 512 and 2048, eager and graphed; the rate of the second half of each run
#     (after compilation and capture). Runs are skipped once BUDGET (280) seconds have passed.
#  3. the trainers' pytest files, on CUDA (their CUDA tests compare graphed and eager steps on tiny models).
# Every step keeps going when one fails; failures are written into summary.txt.
set -u
OUT=${OUT:?set OUT}
STEPS=${STEPS:-200}
BUDGET=${BUDGET:-280}
mkdir -p "$OUT"
W=$(mktemp -d)
S="$OUT/summary.txt"
T0=$SECONDS
LR=0.000244140625  # 2^-12
say() { echo "$*" | tee -a "$S"; }
say "gpu_check_step_graph: $(python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' 2>&1)"

tok() {  # out-dir, extra flags...
  local dir=$1; shift
  timeout 300 python train_tokenizer.py --preset fmnist --data fashion-mnist --lpips-weight 0 --repa-weight 0 \
    --data-on-device --compile --seed 0 --num-show 1 --show-every 100000 --ckpt-every 100000 --out-dir "$W/$dir" \
    "$@" >>"$W/$dir.log" 2>&1 || say "FAILED (exit $?): train_tokenizer.py $dir $*"
}
ar() {
  local dir=$1; shift
  timeout 300 python train_ar.py train --codes "$W/codes" --gpt-model GPT-fmnist --data-on-device --compile \
    --seed 0 --ckpt-every 100000 --out-dir "$W/$dir" "$@" >>"$W/$dir.log" 2>&1 \
    || say "FAILED (exit $?): train_ar.py train $dir $*"
}

# codes for the AR runs: random tokens in GPT-fmnist's shape (60000 images x 2 views, 64 tokens of 512, 10 classes);
# the step's cost does not depend on what the tokens are
python - "$W/codes" <<'EOF' || say "FAILED: making the codes"
import json, sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1]); out.mkdir()
rng = np.random.default_rng(0)
np.save(out / "codes.npy", rng.integers(0, 512, (120000, 64)).astype(np.int16))
np.save(out / "labels.npy", np.tile(rng.integers(0, 10, 60000), 2))
(out / "meta.json").write_text(json.dumps(dict(num_images=60000, views=2, num_tokens=64, vocab_size=512,
                                               num_classes=10, complete=True, skipped=[])))
EOF

# ---- 1. equality (all at once: these runs are not timed), with the pytest files alongside ----
(timeout 200 python -m pytest -q -rs tests/test_train_tokenizer.py tests/test_train_ar.py tests/test_trainer.py \
   >"$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >>"$OUT/pytest.txt") &
PYTEST=$!
EQ=(--global-batch-size 512 --lr $LR --log-every 1)
pids=()
tok tok-eager1 "${EQ[@]}" --warmup-steps 4 --max-steps 30 & pids+=($!)
tok tok-eager2 "${EQ[@]}" --warmup-steps 4 --max-steps 30 & pids+=($!)
tok tok-graph "${EQ[@]}" --warmup-steps 4 --max-steps 30 --cuda-graph & pids+=($!)
tok tok-split "${EQ[@]}" --warmup-steps 4 --max-steps 15 --cuda-graph & pids+=($!)
ar ar-eager1 "${EQ[@]}" --ema --max-steps 30 & pids+=($!)
ar ar-eager2 "${EQ[@]}" --ema --max-steps 30 & pids+=($!)
ar ar-graph "${EQ[@]}" --ema --max-steps 30 --cuda-graph & pids+=($!)
ar ar-split "${EQ[@]}" --ema --max-steps 15 --cuda-graph & pids+=($!)
wait "${pids[@]}"
pids=()
tok tok-split "${EQ[@]}" --warmup-steps 4 --max-steps 30 --cuda-graph --resume & pids+=($!)
ar ar-split "${EQ[@]}" --ema --max-steps 30 --cuda-graph --resume & pids+=($!)
wait "${pids[@]}"
say "equality runs done at $((SECONDS - T0)) s"

python - "$W" <<'EOF' 2>&1 | tee -a "$S"
import re, sys
from pathlib import Path
import torch
W = Path(sys.argv[1])

def losses(run):
    text = (W / f"{run}.log").read_text() if (W / f"{run}.log").exists() else ""
    return [float(m) for m in re.findall(r"^step \d+\S* \| loss (\S+)", text, re.M)]

def weights(run):
    path = W / run / "ckpt.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

for kind in ("tok", "ar"):
    base, base_losses = weights(f"{kind}-eager1"), losses(f"{kind}-eager1")
    print(f"{kind}: eager1 logged {len(base_losses)} losses, first {base_losses[:1]}, last {base_losses[-1:]}")
    for other in ("eager2", "graph", "split"):
        ckpt, ls = weights(f"{kind}-{other}"), losses(f"{kind}-{other}")
        if base is None or ckpt is None:
            print(f"  {kind}-{other}: MISSING checkpoint")
            continue
        rows = []
        for key in ("model", "ema"):
            diffs = [(base[key][k].float() - ckpt[key][k].float()).abs().max().item() for k in base[key]]
            scale = max(base[key][k].float().abs().max().item() for k in base[key])
            rows.append(f"{key} max|diff| {max(diffs):.3e} (max|w| {scale:.3f}, {sum(d > 0 for d in diffs)} of "
                        f"{len(diffs)} tensors differ)")
        if other == "split":  # the log of the resumed run's second half is appended to its first
            ls = ls[:15] + ls[-15:]
        n = min(len(ls), len(base_losses))
        dl = max((abs(a - b) for a, b in zip(ls, base_losses)), default=float("nan"))
        verdict = "EQUAL" if all("max|diff| 0.000e+00" in r for r in rows) else "DIFFERENT"
        print(f"  eager1 vs {other}: {verdict}; step {ckpt['step']}; {'; '.join(rows)}; logged losses (4 decimals) "
              f"max|diff| {dl:.4f} over {n} steps")
EOF

# ---- 2. speed (one run at a time, after the tests: the eager step is bound by one host core) ----
wait "$PYTEST"
say "pytest: $(tail -2 "$OUT/pytest.txt" | tr '\n' ' ')"
speed() {  # log file, images per step -> the last log line's rate and the step time it gives
  local r
  r=$(grep -oE "[0-9,]+ (img|tok)/s" "$1" 2>/dev/null | tail -1)
  [[ -z $r ]] && { echo "no rate logged"; return; }
  echo "$r" | tr -d , | awk -v B="$2" '{n = B * ($2 == "tok/s" ? 64 : 1)  # an AR sequence: 64 tokens
    printf "%s %s, %.1f ms/step", $1, $2, 1000 * n / $1}'
}
for B in 512 2048; do
  for kind in tok ar; do
    for mode in eager graph; do
      run="speed-$kind-$B-$mode"
      if (( SECONDS - T0 > BUDGET )); then say "skipped $run: past the ${BUDGET} s budget"; continue; fi
      flags=(--global-batch-size $B --max-steps $STEPS --log-every $((STEPS / 2)))
      [[ $mode == graph ]] && flags+=(--cuda-graph)
      start=$SECONDS
      if [[ $kind == tok ]]; then tok "$run" "${flags[@]}"; else ar "$run" "${flags[@]}"; fi
      say "$kind batch $B $mode: $(speed "$W/$run.log" $B) over steps $((STEPS / 2 + 1))-$STEPS" \
        "($((SECONDS - start)) s with start-up)"
    done
  done
done

for f in "$W"/*.log; do echo "== $(basename "$f")"; tail -n 8 "$f"; done >"$OUT/logs.txt"
say "total $((SECONDS - T0)) s"
