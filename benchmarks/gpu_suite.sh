#!/usr/bin/env bash
# GPU session: run the reference captioners through `capdiag check` on CUDA, train them with
# the hooks under bf16 autocast, and measure hook overhead on the GPU. Writes to $1 (default ./gpu-out).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="${1:-gpu-out}"
mkdir -p "$OUTDIR"
cd /tmp  # not the repo root: import the installed capdiag (with capdiag.models/checks mapped)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
for spec in "capdiag.models.cnn_transformer" "capdiag.models.cnn_transformer --arg bug=xavier_init_clobbers_encoder --arg encoder=efficientnet_lite0" \
            "capdiag.models.show_attend_tell" "capdiag.models.show_attend_tell --arg bug=att_softmax_wrong_dim" \
            "capdiag.models.cnn_transformer --arg size=full" \
            "capdiag.models.clip_decoder" "capdiag.models.clipcap" "capdiag.models.dual_transfer" \
            "capdiag.models.dual_transfer --arg bug=xavier_init_clobbers_encoder" \
            "capdiag.models.clip_decoder --arg size=full" "capdiag.models.clipcap --arg size=full"; do
    name=$(echo "$spec" | tr ' =.' '___' | cut -c1-80)
    echo "== capdiag check $spec --device cuda"
    /usr/bin/time -f "%e s wall" python3 -m capdiag check $spec --device cuda --json "$OUTDIR/$name.json" --out "$OUTDIR/plots_$name" 2>&1 \
        | grep -E "PASS|FAIL|WARN|SKIP|ERROR|checks:|wall|error" | cut -c1-160
done
[ -n "${SKIP_AMP:-}" ] || python3 "$REPO/benchmarks/amp_training.py" --steps 300 2>&1 | tail -20
python3 "$REPO/benchmarks/hook_overhead.py" --device cuda --amp --steps 100 --rounds 3 --batch 32 2>&1 | tail -8
