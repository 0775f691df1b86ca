"""False alarms and recall on vision-language captioners: every check on a tiny random folder of each
family (several seeds, float32 and bfloat16), and every twin of ``capdiag.testing.vlm`` judged by the
check it names. A false alarm is a ``fail`` or ``error`` on a clean folder; a twin is caught when the
check named for it fails.

    python benchmarks/vlm_suite.py --seeds 3 --json benchmarks/results/vlm_suite.json
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# (twin, family) pairs: the collator and model-file twins, each on the families whose layout it applies to
COLLATOR_TWINS = {
    "prompt_unmasked": ("llava", "paligemma"), "image_tokens_as_targets": ("llava", "blip-2"),
    "pre_shifted_labels": ("llava", "qwen2_vl", "smolvlm", "florence2", "llava_next", "idefics3"), "eos_not_target": ("llava",),
    "image_dropped": ("llava", "qwen2_vl", "paligemma", "blip-2", "smolvlm", "florence2", "qwen2_5_vl", "llava_next",
                      "idefics3"),
    "prompt_hidden": ("llava", "paligemma", "blip-2", "qwen2_5_vl"), "image_masked": ("llava", "qwen2_vl", "blip-2", "llava_next"),
    "pads_as_targets": ("florence2",), "double_rescale": ("llava", "qwen2_vl", "smolvlm", "florence2"),
    "vision_no_grad": ("llava", "qwen2_vl", "paligemma", "blip-2", "smolvlm", "florence2", "qwen2_5_vl", "llava_next",
                       "idefics3"),
    "first_image_prompt_length": (),
}
BF16_TWINS = ("image_masked", "prompt_hidden")
LORA = {"llava": (r".*language_model.*\.(q_proj|v_proj)", "multi_modal_projector"),
        "qwen2_vl": (r".*language_model.*\.(q_proj|v_proj)", "merger"),
        "florence2": (r".*language_model.*\.(q_proj|v_proj)", "multi_modal_projector")}
FOLDER_TWINS = {"right_padding": ("llava", "qwen2_vl"), "generation_start": ("florence2",),
                "no_rescale": ("llava", "qwen2_vl")}
FOLDER_CHECK = {"right_padding": "decoding_consistency", "generation_start": "decoding_consistency",
                "no_rescale": "input_sanity"}


def subject(target: str, precision=None, seed: int = 0, adapter=None):
    from capdiag.options import subject_from

    opts = {"precision": precision, "seed": seed, "factory": "build_model", "adapter": adapter}
    return subject_from(target, lambda k: opts.get(k), progress=False)[1]


def statuses(s, names) -> dict:
    from capdiag.registry import get_check
    from capdiag.runner import run_check

    return {n: run_check(s, get_check(n)).status.value for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from capdiag.registry import select_checks
    from capdiag.testing import vlm

    names = select_checks(kind="prompted")
    started = time.perf_counter()
    clean, twins = collections.defaultdict(dict), {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for family in vlm.FAMILIES:
            for seed in range(args.seeds):
                folder = vlm.build_folder(family, tmp / f"{family}-{seed}", seed=seed)
                for precision in ("float32", "bfloat16"):
                    clean[f"{family}/seed{seed}/{precision}"] = statuses(subject(str(folder), precision), names)
            for bug, families in COLLATOR_TWINS.items():
                if family in families:
                    path = vlm.write_model_file(tmp / f"{family}-{bug}.py", tmp / f"{family}-0", family, bug)
                    check = vlm.BUGS.get(bug) or vlm.MODEL_BUGS[bug]
                    twins[f"{family}/{bug}"] = (check, statuses(subject(str(path)), [check])[check])
                    if bug == "image_masked":  # the same twin, by where the caption's attention goes
                        twins[f"{family}/{bug}/attention"] = ("attention_maps", statuses(
                            subject(str(path)), ["attention_maps"])["attention_maps"])
                    if bug in BF16_TWINS:  # a masked input moves nothing at any precision: still a failure in bf16
                        twins[f"{family}/{bug}/bfloat16"] = (check, statuses(subject(str(path), "bfloat16"), [check])[check])
            for bug, families in FOLDER_TWINS.items():
                if family in families:
                    folder = vlm.build_folder(family, tmp / f"{family}-{bug}", bug=bug)
                    check = FOLDER_CHECK[bug]
                    twins[f"{family}/{bug}"] = (check, statuses(subject(str(folder)), [check])[check])
            if family in LORA:  # a LoRA on the language side only (twin), and one that trains the projector (clean)
                from capdiag.prompted.folder import load_folder

                lang, proj = LORA[family]
                for name, targets, save in (("language_only", lang, None), ("with_projector", lang, [proj])):
                    model, _, _ = load_folder(str(tmp / f"{family}-0"))
                    adapter = vlm.save_lora(model, tmp / f"{family}-{name}", targets, save)
                    got = statuses(subject(str(tmp / f"{family}-0"), adapter=str(adapter)), ["adapters", "gradient_flow"])
                    if name == "language_only":
                        twins[f"{family}/lora_{name}"] = ("adapters", got["adapters"])
                    else:
                        clean[f"{family}/lora_{name}"] = got
            print(family, "done", flush=True, file=sys.stderr)
    out = {"command": f"python benchmarks/vlm_suite.py --seeds {args.seeds} --json benchmarks/results/vlm_suite.json",
           "seconds": round(time.perf_counter() - started), "clean": clean, "twins": twins}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    fa = sum(v in ("fail", "error") for st in clean.values() for v in st.values())
    caught = sum(st == "fail" for _, st in twins.values())
    print(f"{len(clean)} clean runs, {fa} false alarms; {caught} of {len(twins)} twins caught by their check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
