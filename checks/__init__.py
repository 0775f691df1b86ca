"""Built-in checks, one per module, each registered under its module's name.

Importing this package registers them in this order (cheap structural checks first).
"""
from . import (  # noqa: F401
    loss_at_init,
    input_mutation,
    causal_leak,
    caption_dependence,
    batch_independence,
    padding_invariance,
    gradient_reachability,
    eval_determinism,
    input_sanity,
    loss_sanity,
    metric_sanity,
    pretrained_guard,
    frozen_drift,
    gradient_flow,
    overfit,
    image_ablation,
    decoding_consistency,
    attention_maps,
    attribution,
    caption_collapse,
    word_grounding,
)
