"""Built-in checks, one per module, each registered under its module's name.

Importing this package registers them in this order (cheap structural checks first).
"""
from capdiag.measure.origins import called_location
from capdiag.registry import register_locator

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
    label_sanity,
    prompt_ablation,
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
    adapters,
)

# A failing check that located nothing points at the user's method it called ("called from").
register_locator(called_location)
