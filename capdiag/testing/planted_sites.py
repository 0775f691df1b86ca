"""Where each planted bug in the repository lives: the module a failing check must name (dotted name
as in ``named_modules()``; "" for the model's own forward) and a fragment of the source line that
holds the bug (None where no single line does).

Keys: ``zoo/<bug>`` (every architecture the bug applies to), ``unusual/<bug>``, ``<family>/<bug>``
for the reference families. ``tests/test_localize.py`` and ``benchmarks/localization.py`` judge the
locations checks report against this table.
"""
from __future__ import annotations

from capdiag.testing import held_out as _held_out

SITES = {
    # the zoo (capdiag/testing/zoo.py)
    "zoo/no_causal_mask": ("decoder.layers.0.self_attn", "tgt_mask=mask"),
    "zoo/batch_mean_image": ("", "regions.mean(0"),
    "zoo/relative_positions": ("", "* 63 //"),
    "zoo/detached_image": ("", "regions.detach()"),
    "zoo/unused_module": ("aux_head", "self.aux_head ="),
    "zoo/eval_dropout": ("", "F.dropout(x, 0.3, training=True)"),
    "zoo/eval_free_running": ("", None),  # forward branches to free_run: no single op to point at
    "zoo/caption_blind": ("", "torch.full_like(captions, BOS)"),
    "zoo/double_shift": ("", "shifted once more"),
    "zoo/inplace_normalize": ("", "images.sub_(0.1)"),
    "zoo/huge_init": ("out", "self.out.weight.mul_(60.0)"),
    "zoo/nan_logits": ("", "torch.log("),
    "zoo/normalizes_again": ("", "(images - mean) / std"),
    "zoo/image_blind": ("", "torch.zeros_like(regions)"),
    "zoo/generate_ignores_image": ("", "images = torch.zeros_like(images)"),
    "zoo/att_softmax_wrong_dim": ("attention", "dim=0"),
    "zoo/uniform_attention": ("attention", "scores * 0.0"),
    # the unusual family (capdiag/testing/unusual.py)
    "unusual/positional_along_batch": ("pos", "self.pe[: x.size(0)]"),
    "unusual/cached_encoder": ("", "self._cache"),
    "unusual/frozen_bn_drifts": ("encoder", None),
    # the reference families
    "show_attend_tell/xavier_init_clobbers_encoder": ("encoder", "apply(xavier_init)"),
    "show_attend_tell/image_not_fed": ("", "images = torch.zeros_like(images)"),
    "show_attend_tell/loss_counts_padding": ("ShowAttendTell.loss_fn", "cross_entropy"),
    "show_attend_tell/att_softmax_wrong_dim": ("attention", "dim=0 if self.wrong_dim"),
    "cnn_transformer/xavier_init_clobbers_encoder": ("encoder", "apply(xavier_init)"),
    "cnn_transformer/no_causal_mask": ("text.decoder.layers.0.self_attn", "tgt_mask=mask"),
    "cnn_transformer/image_not_fed": ("", "self.memory_const.expand"),
    "cnn_transformer/loss_counts_padding": ("CNNTransformerCaptioner.loss_fn", "cross_entropy"),
    "cnn_transformer/bleu_counts_padding": ("CNNTransformerCaptioner.bleu_fn", None),
    "clip_decoder/no_causal_mask": ("text.decoder.layers.0.self_attn", "tgt_mask=mask"),
    "clip_decoder/image_not_fed": ("", "self.memory_const.expand"),
    "clip_decoder/loss_counts_padding": ("ClipDecoderCaptioner.loss_fn", "cross_entropy"),
    "clip_decoder/bleu_counts_padding": ("ClipDecoderCaptioner.bleu_fn", None),
    "clip_decoder/xavier_init_clobbers_encoder": ("clip", "apply(xavier_init)"),
    "clipcap/image_not_fed": ("", "emb = torch.zeros_like(emb)"),
    "clipcap/prefix_off_by_one": ("", "logits[:, K - 1 : -1]"),
    "clipcap/loss_ignores_eos": ("EndOfTextRecipe.loss_fn", "ignore_index=pad"),
    "clipcap/bleu_counts_padding": ("EndOfTextRecipe.bleu_fn", None),
    "clipcap/xavier_init_clobbers_encoder": ("clip", "apply(xavier_init)"),
    "dual_transfer/xavier_init_clobbers_encoder": ("encoder", "apply(xavier_init)"),
    "dual_transfer/image_not_fed": ("", "return torch.zeros(images.shape[0]"),
    "dual_transfer/batch_mean_image": ("", "f.mean((0, 2, 3))"),
    "dual_transfer/loss_ignores_eos": ("EndOfTextRecipe.loss_fn", "ignore_index=pad"),
    "dual_transfer/bleu_counts_padding": ("EndOfTextRecipe.bleu_fn", None),
}
# families written later (capdiag.testing): their sites live beside their twins
SITES.update(_held_out.SITES)
SITES.update({
    "decoding/beam_state_not_reordered": ("", "h[:k], c[:k]"),
    "decoding/beam_without_causal_mask": ("", "causal=causal"),
    "decoding/stop_on_any_eos": ("", "done.any()"),
    "decoding/encoder_cached_in_generate": ("", "self._memory"),
    "decoding/image_only_at_step0": ("", "else torch.zeros_like(ctx)"),
    "decoding/kv_positions_stuck": ("", "self.pos.weight[pos]"),
    "strangers/region_mask_from_zeros": ("enc.0", "sum(-1) == 0"),
    "strangers/trunk_bn_drifts": ("trunk", None),
})


def judge(expected: tuple, location, model_class: str) -> tuple:
    """``(module right, line right)`` for a reported ``location`` against ``expected`` (module, fragment).

    The module is right when it is the expected one or its direct parent; the line when the reported
    source line contains the fragment (None: no line to judge, counted right when the module is).
    """
    if location is None:
        return False, False
    module, fragment = expected
    got = location.module
    if got == f"({model_class})":
        got = ""
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    module_ok = got == module or (bool(module) and got == parent)
    if fragment is None:
        return module_ok, module_ok
    return module_ok, bool(location.code and fragment in location.code)
