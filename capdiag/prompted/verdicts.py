"""The verdicts of the checks on a prompted captioner, one function per check: each takes the check (for
``finding``) and the ``PromptedSubject`` and returns the ``Finding``. The checks in ``capdiag.checks`` call
them when ``subject.kind == "prompted"``; every threshold is a noise floor measured in the same run or
exact arithmetic.
"""
from __future__ import annotations

import math

from ..finding import Finding, Status
from .generation import batched_vs_alone, start_token_gap
from .labels import label_facts, label_problems
from .parts import IMAGE_SIDE, SIDES, part_gradients, side_of
from .probes import image_attention, image_effect, pixel_range, prompt_effect, reliance
from .folder import quiet


def _measured(s, key: str, compute):
    """``s.measured``, computed in eval mode (dropout off, as the captioner checks probe): a model file may
    hand over a model in train mode, and dropout would set the noise floors, not the model."""
    from ..state import in_mode

    def evaluated():
        with in_mode(s.model, False):
            return compute()
    return s.measured(key, evaluated)


def _batch_words(s) -> str:
    from .subject import SOURCES

    return SOURCES[s.source]


def label_sanity(check, s) -> Finding:
    facts = _measured(s, "label_facts", lambda: label_facts(s.model, s.batch, s.prompt_len, s.image_token_id,
                                                          s.tokenizer.eos_token_id, s.start_id))
    metrics = {"targets": facts.targets, "prompt_targets": facts.prompt_targets, "image_targets": facts.image_targets,
               "pad_targets": facts.pad_targets, "eos_rows": facts.eos_rows, "rows": facts.rows,
               "shifted_share": facts.next_input}
    if facts.loss is not None:
        metrics.update(loss=facts.loss, caption_mean=facts.caption_mean)
    problems = label_problems(facts)
    if problems:
        return check.finding(Status.FAIL, f"the labels of the batch from {_batch_words(s)}: " + "; ".join(problems),
                             metrics, _label_fix(problems))
    return check.finding(Status.PASS, f"{facts.targets} targets, all on the captions, EOS in {facts.eos_rows} of "
                         f"{facts.rows}; the model's loss is the caption mean ({_batch_words(s)})", metrics)


LABEL_FIXES = (  # a clause label_problems wrote -> what to change, for that clause only
    ("pre-shifted", "do not shift the labels: the model shifts them itself"),
    ("begin with the decoder start token", "leave the decoder start token out of the labels: the model prepends it"),
    ("prompt positions are targets", "set the labels to -100 on the prompt"),
    ("image placeholder positions are targets", "set the labels to -100 on the image placeholders"),
    ("padding positions are targets", "set the labels to -100 where the attention mask is 0 (the padding)"),
    ("caption tokens are -100", "keep every caption token as a target"),
    ("EOS is not a target", "keep each caption's EOS as a target (mask padding by the attention mask, not by id)"),
    ("no pixel_values", "pass the images to the processor with the text so the batch carries pixel_values"),
    ("features per image", "write as many image placeholders as the vision side gives features (the processor's settings)"),
)


def _label_fix(problems: list) -> str:
    fixes = [fix for key, fix in LABEL_FIXES if any(key in p for p in problems)]
    text = "; ".join(fixes) + "."
    return text[0].upper() + text[1:] if fixes else "The model's loss is not the caption mean: compare its loss with your collator's labels."


def _effect_metrics(prefix: str, e) -> dict:
    return {f"{prefix}_effect": e.effect, f"{prefix}_floor": e.floor, f"{prefix}_ratio": e.ratio}


def image_ablation(check, s) -> Finding:
    if s.live:  # the training monitor judges the history of the reliance, not one probe
        r = _measured(s, "reliance", lambda: reliance(s.model, s.batch, s.prompt_len))
        if r is None:
            return check.finding(Status.WARN, "the probe batch carries no pixel_values", {"image_reliance": 0.0})
        score, true, moved, how = r
        ln_v = math.log(s.base.get_input_embeddings().num_embeddings)
        if true > 0.8 * ln_v:  # nothing learned yet: a reliance of 0 would say nothing about the image
            return check.finding(Status.WARN, f"caption loss {true:.2f} near ln V = {ln_v:.2f}: nothing to judge yet",
                                 {"loss_true": true})
        return check.finding(Status.PASS if score >= check.min_reliance else Status.WARN,
                             f"image reliance {score:.2f} ({how}: caption loss {true:.3f} -> {moved:.3f})",
                             {"image_reliance": score, "loss_true": true, "loss_other": moved})
    e = _measured(s, "image_effect", lambda: image_effect(s.model, s.batch, s.prompt_len))
    if e is None:
        return check.finding(Status.FAIL, f"the batch from {_batch_words(s)} carries no pixel_values: the model "
                             "captions without the image", {}, "Pass the images to the processor with the text "
                             "(processor(images=..., text=...)) and keep pixel_values (and image_grid_thw, "
                             "pixel_attention_mask, ...) in the batch.")
    metrics = _effect_metrics("image", e)
    said = f"{e.how}: caption log-probabilities move by at most {e.effect:.2g} (noise floor {e.floor:.2g})"
    if e.verdict == "none":
        a = _measured(s, "image_attention", lambda: image_attention(s.model, s.batch, s.prompt_len, s.image_token_id))
        hint = ("The attention mask hides the image placeholders from the caption (attention on them: 0): keep "
                "attention_mask 1 there; only the labels are -100." if a is not None and a.share <= 1e-6 else
                "The caption attends to the image placeholders, but their embeddings do not change with the image: "
                "the projector's output is constant (zeroed, or the features replaced) or the vision tower's input is.")
        return check.finding(Status.FAIL, f"the captions ignore the image: {said}", metrics, hint)
    if e.verdict == "unresolved":
        return check.finding(Status.WARN, f"cannot tell at this precision: {said}; rerun with --precision float32",
                             metrics)
    if e.verdict == "weak":
        return check.finding(Status.WARN, f"the captions barely depend on the image: {said}", metrics)
    return check.finding(Status.PASS, f"the captions depend on the image: {said}", metrics)


def prompt_ablation(check, s) -> Finding:
    image = _measured(s, "image_effect", lambda: image_effect(s.model, s.batch, s.prompt_len))
    prompt = _measured(s, "prompt_effect", lambda: prompt_effect(s.model, s.batch, s.prompt_len, s.tokenizer,
                                                               s.image_token_id))
    metrics = _effect_metrics("prompt", prompt) if prompt is not None else {}
    if image is not None:
        metrics.update(_effect_metrics("image", image))
    if prompt is None:
        return check.skip(f"the prompt {s.prompt!r} has no word to replace (image and special tokens only)")
    said = (f"replacing the prompt's words moves caption log-probabilities by at most {prompt.effect:.2g} "
            f"(noise floor {prompt.floor:.2g})")
    hint = ("The caption tokens cannot see the prompt: check the attention mask over the prompt (built from the "
            "labels?) and that the prompt is in input_ids, not only in the labels.")
    if prompt.verdict == "none":
        return check.finding(Status.FAIL, f"the captions ignore the prompt: {said}", metrics, hint)
    if "unresolved" in (prompt.verdict, getattr(image, "verdict", None)):
        return check.finding(Status.WARN, f"cannot tell at this precision: {said}; rerun with --precision float32",
                             metrics)
    if image is None or image.verdict == "none":
        return check.finding(Status.FAIL, f"the captions read the prompt but not the image ({said}; "
                             f"{'no pixel_values' if image is None else f'{image.how}: at most {image.effect:.2g}'})",
                             metrics, "See image_ablation.")
    strong = prompt.verdict == "depends"
    return check.finding(Status.PASS if strong else Status.WARN, f"the captions {'depend' if strong else 'barely depend'}"
                         f" on the prompt ({said}) and on the image", metrics)


def decoding(check, s) -> Finding:
    side = s.tokenizer.padding_side
    if s.family.encoder_decoder:
        with quiet():
            st = _measured(s, "start_token", lambda: start_token_gap(s.model, s.batch, s.prompt_len, s.tokenizer))
        metrics = {"start_gap": st.gap, "floor": st.floor, "train_start": st.train, "generate_start": st.generate}
        if st.gap > st.floor:
            said = (f"generate() starts the decoder from token {st.generate} (generation_config.decoder_start_token_id) "
                    f"but training shifts the labels behind token {st.train}" if st.generate != st.train else
                    f"generate() and the teacher-forced forward both start from token {st.train}")
            return check.finding(Status.FAIL, f"the first generated step's log-probabilities differ from the "
                                 f"forward's by {st.gap:.2g} (floor {st.floor:.2g}): {said}", metrics,
                                 "Make generation_config.decoder_start_token_id the model config's "
                                 "decoder_start_token_id (the token training puts before the labels)."
                                 if st.generate != st.train else "Compare generate()'s inputs with the forward's.")
    with quiet():
        b = _measured(s, f"batched_{side}", lambda: batched_vs_alone(s.model, s.batch, s.prompt_len, s.tokenizer, side))
    metrics = {"rows": b.rows, "changed": b.changed, "near_ties": b.near_ties, "first_step_gap": b.first_step,
               "floor": b.floor}
    if b.changed:
        shown = "; ".join(f"{a!r} alone, {t!r} batched" for a, t in b.examples[:2])
        return check.finding(
            Status.FAIL, f"batched generate() of prompts of different lengths, padded on the {side} as the processor "
            f"pads them, changes {b.changed} of {b.rows} captions against each prompt alone (first-step log-probs "
            f"differ by up to {b.first_step:.2g}, floor {b.floor:.2g}): {shown}", metrics,
            "A decoder-only model continues each row from its last position: pad prompts on the left for "
            "generation (processor.tokenizer.padding_side = \"left\", or save the processor with padding_side=\"left\").")
    ties = f"; {b.near_ties} differ only after a near tie" if b.near_ties else ""
    start = (f"; generate() starts the decoder where training does (token {st.train}, first-step gap {st.gap:.2g})"
             if s.family.encoder_decoder else "")
    if s.family.encoder_decoder:
        metrics.update(start_gap=st.gap, train_start=st.train)
    return check.finding(Status.PASS, f"batched generate() padded on the {side} gives each prompt's caption alone "
                         f"({b.rows} rows, first-step gap {b.first_step:.2g} <= floor {b.floor:.2g}){ties}{start}", metrics)


def gradient_flow(check, s) -> Finding:
    if s.live:  # the training step's own .grad, nothing recomputed
        norms = {n: float(p.grad.detach().float().norm()) for n, p in s.model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        bad = [n for n, v in norms.items() if not math.isfinite(v)]
        metrics = {"n_nonfinite_grads": float(len(bad))}
        for side in SIDES:
            vals = [v for n, v in norms.items() if side_of(n, s.family) == side and math.isfinite(v)]
            if vals:
                metrics[f"{side}_grad_norm"] = math.sqrt(sum(v * v for v in vals))
        return check.finding(Status.FAIL if bad else Status.PASS, f"{len(bad)} non-finite gradients" if bad else
                             f"gradients of {len(norms)} parameters", metrics)
    g = _measured(s, "part_gradients", lambda: part_gradients(s.model, s.batch, s.prompt_len, s.family))
    metrics = {"loss": g.loss}
    dead, by_design, dead_names = [], [], []
    for side in SIDES:
        for adapter in (False, True):
            names = g.group(side, adapter)
            label = f"{side} {'adapters' if adapter else 'weights'}"
            if not names:
                continue
            reached = g.reached(names)
            metrics[f"{side}{'_adapter' if adapter else ''}_reached"] = len(reached) / len(names)
            missed = [n for n in names if n not in reached]
            if not reached:
                dead.append(f"no {label} get gradient ({len(names)} trainable)")
                dead_names += missed
            elif missed and all(g.by_design([n]) or g.on_path([n]) for n in missed):
                unread = [n for n in missed if g.by_design([n])]
                if unread:
                    by_design.append(f"{len(unread)} {label} in modules whose output the caption never reads "
                                     f"(e.g. {unread[0]}) get none, by design")
                if len(unread) < len(missed):
                    flat = [n for n in missed if g.on_path([n])]
                    by_design.append(f"{len(flat)} {label} on the loss's path have an exactly zero gradient at "
                                     f"these weights (e.g. {flat[0]})")
            elif missed:
                dead.append(f"{len(missed)} of {len(names)} {label} get no gradient (e.g. {missed[0]})")
                dead_names += missed
    if g.nonfinite:
        return check.finding(Status.FAIL, f"{len(g.nonfinite)} parameters get NaN/inf gradients (e.g. {g.nonfinite[0]})",
                             metrics, "Look for overflow in half precision or a log/division near zero in the loss.")
    if dead:
        cause = g.cause(dead_names, "pixel_values" in s.batch) or "follow what connects it to the caption tokens"
        return check.finding(Status.FAIL, "; ".join(dead) + " from the caption loss", metrics,
                             f"A part that gets no gradient does not learn: {cause}.")
    trainable = {side: len(g.group(side, False)) + len(g.group(side, True)) for side in SIDES}
    parts = ", ".join(f"{side} {n}" for side, n in trainable.items() if n)
    extra = f" ({'; '.join(by_design)})" if by_design else ""
    return check.finding(Status.PASS, f"every trainable part gets gradient from the caption loss: {parts} "
                         f"parameters{extra}", metrics)


def adapters(check, s) -> Finding:
    peft_config = getattr(s.model, "peft_config", None)
    if not peft_config:
        return check.skip("no peft adapter on the model (pass --adapter DIR, or return a PeftModel from build_model)")
    config = next(iter(peft_config.values()))
    g = _measured(s, "part_gradients", lambda: part_gradients(s.model, s.batch, s.prompt_len, s.family))
    metrics = {f"{side}_{kind}": len(g.group(side, kind == "adapters")) for side in SIDES for kind in ("adapters", "weights")}
    targets = sorted(config.target_modules) if isinstance(config.target_modules, (set, list, tuple)) else config.target_modules
    base = [n for n in g.norms if n not in g.adapters]
    if base:
        return check.finding(Status.FAIL, f"{len(base)} base-model parameters are trainable beside the adapters "
                             f"(e.g. {base[0]}): the base is not frozen", metrics,
                             "With LoRA only the adapters (and modules_to_save) train: load with "
                             "PeftModel.from_pretrained / get_peft_model and do not set requires_grad on the base.")
    image_side = [n for side in IMAGE_SIDE for n in g.group(side, True)]
    if not image_side:
        return check.finding(Status.FAIL, f"nothing image-side can train: the LoRA config targets {targets} "
                             f"(modules_to_save {config.modules_to_save}) and none of them is in the vision tower "
                             f"or the projector", metrics,
                             "The image features stay as the base model made them. Add the projector to "
                             "modules_to_save (e.g. multi_modal_projector) or target the vision tower's attention "
                             "projections.")
    reached = g.reached(image_side)
    if not reached:
        cause = g.cause(image_side, "pixel_values" in s.batch) or "follow what connects them to the caption tokens"
        return check.finding(Status.FAIL, f"none of the {len(image_side)} image-side adapter weights gets gradient "
                             "from the caption loss", metrics, f"The adapters sit where the caption loss does not reach: {cause}.")
    missed = [n for n in image_side if n not in reached]
    note = (f"; {len(missed)} sit in modules whose output the caption never reads and get none, by design"
            if missed and g.by_design(missed) else
            f"; {len(missed)} get none (e.g. {missed[0]})" if missed else "")
    return check.finding(Status.PASS, f"LoRA on {targets}: {len(reached)} of {len(image_side)} image-side adapter "
                         f"weights get gradient, the base is frozen{note}", metrics)


def input_sanity(check, s) -> Finding:
    got = pixel_range(s.processor.image_processor, s.batch)
    if got is None:
        return check.skip("the batch carries no pixel_values, or its processor does not normalize them")
    low, high = got
    metrics = {"pixel_min": low, "pixel_max": high}
    said = (f"the batch's pixels, the processor's normalization undone, span [{low:.3g}, {high:.3g}] "
            f"({_batch_words(s)})")
    if high < 0.05:  # 1/255 of the range: a [0, 1] image rescaled by 1/255 again
        return check.finding(Status.FAIL, f"{said}: the images were rescaled twice (0-1 floats rescaled by 1/255 "
                             "again)", metrics, "Pass the processor uint8 images (or PIL images), or float images "
                             "with do_rescale=False.")
    if high > 2.0:  # 0-255 values that skipped the rescale
        return check.finding(Status.FAIL, f"{said}: 0-255 pixels reached the model (the 1/255 rescale was skipped)",
                             metrics, "Save the image processor with do_rescale=True, or rescale the images to [0, 1].")
    return check.finding(Status.PASS, f"{said}: each image rescaled to [0, 1] once, then normalized", metrics)


def attention_maps(check, s) -> Finding:
    if "pixel_values" not in s.batch:
        return check.skip("the batch carries no image (see image_ablation)")
    a = _measured(s, "image_attention", lambda: image_attention(s.model, s.batch, s.prompt_len, s.image_token_id))
    if a is None:
        return check.skip("the model returns no attention weights: load it with attn_implementation=\"eager\"")
    what = "cross-attention" if a.cross else "attention"
    metrics = {"image_attention_share": a.share, "uniform_share": a.uniform}
    said = (f"the caption tokens put {a.share:.1%} of their {what} on the image placeholders (which are "
            f"{a.uniform:.1%} of the row's tokens; {a.layers} layers, heads averaged)")
    if a.share <= 1e-6:
        return check.finding(Status.FAIL, f"{said}: the image is masked out of the caption's attention", metrics,
                             "The attention mask hides the image placeholders: keep attention_mask 1 on them (only "
                             "the labels are -100 there).")
    return check.finding(Status.PASS, said, metrics)
