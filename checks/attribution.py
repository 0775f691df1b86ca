"""attribution: a gradient-based second opinion on "does it look at the image" (captum).

For one image and the caption the model generates for it, each word's log-probability is
attributed to the image pixels (Integrated Gradients from a zero image) and to the caption
prefix (Layer Integrated Gradients on the token embedding, from padding tokens). The image
share, sum|A_image| / (sum|A_image| + sum|A_prefix|), is reported per word and overall; a
decoder that never uses the image scores ~0. Works for models without explicit attention.

A pretrained encoder run under ``torch.no_grad()`` (a fixed feature extractor) gives pixels no
gradient: then the image is attributed at the output of ``image_module``, and the finding says
so. When no gradient path exists at all but zeroing the image still moves the words, the check
skips (gradients cannot measure it; image_ablation does) instead of failing. The token embedding
is the one a hook sees called with the caption ids, not merely one with vocabulary-sized rows.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import where_image_dies
from capdiag.hooks import captured_outputs, hooked, replaced_output
from capdiag.measure.gradients import input_grad, reentrant_refusal
from capdiag.measure.probe import precision, rel_diff, tolerance
from capdiag.measure.training import learned_of
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded


def _logp(cap, images, ids, t):
    """Log-probability of word t+1 of ``ids`` (one caption, expanded over the images)."""
    out = cap.logits(images, ids.expand(images.shape[0], -1) if ids.shape[0] == 1 else ids)
    return torch.log_softmax(out[:, t].float(), -1).gather(1, ids[:, t + 1 : t + 2].expand(out.shape[0], 1)).squeeze(1)


def _logp_with(cap, layer, value, images, ids, t, at_input: bool = False):
    """``_logp`` with ``layer``'s output (or first input) replaced by ``value`` (a copy: models that
    add to their embeddings in place, as BLIP's text embeddings do, must not write into the leaf)."""
    if at_input:
        with hooked([layer], lambda m, args: (value.clone(),) + tuple(args[1:]), pre=True):
            return _logp(cap, images, ids, t)
    with replaced_output(layer, lambda o: value.clone()):
        return _logp(cap, images, ids, t)


def _plain_output(cap, layer, images, ids) -> bool:
    """Whether ``layer`` returns a plain tensor (else it is attributed at its first input)."""
    with captured_outputs({"layer": layer}) as out, torch.no_grad():
        cap.logits(images, ids)
    return bool(out["layer"]) and isinstance(out["layer"][0], torch.Tensor)


def _inplace_on_leaf(e: RuntimeError) -> bool:
    return "leaf Variable that requires grad is being used in an in-place operation" in str(e)


def token_embedding(cap, images: torch.Tensor, ids: torch.Tensor):
    """``(name, module)`` of the nn.Embedding the forward calls with the caption ids (or a slice
    of them), found with hooks; ``(None, None)`` when no embedding is called that way."""
    called = []

    def hook(name, m):
        def fn(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dim() == 2 and x.shape[0] == ids.shape[0] \
                    and 0 < x.shape[1] <= ids.shape[1] and bool(torch.equal(x, ids[:, : x.shape[1]])):
                called.append((name, module))
        return fn

    embeds = [(m, hook(name, m)) for name, m in cap.model.named_modules()
              if isinstance(m, nn.Embedding) and m.num_embeddings >= cap.spec.vocab_size]
    with hooked(embeds, pre=True), torch.no_grad():
        cap.logits(images, ids)
    return called[0] if called else (None, None)


def _unused_is_zero(attribute, like):
    """An input the output does not depend on has zero attribution (autograd says "unused")."""
    try:
        return attribute()
    except RuntimeError as e:
        if "not have been used in the graph" not in str(e):
            raise
        return torch.zeros_like(like) if like is not None else None


def ig_by_backward(score: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, baseline: torch.Tensor,
                   n_steps: int) -> torch.Tensor:
    """Integrated Gradients (midpoint Riemann sum) through ``.backward()``, for models with reentrant
    activation checkpointing, which refuse the ``autograd.grad`` captum uses. ``score`` must run on
    a deep copy: the backward accumulates that copy's parameter gradients."""
    total = torch.zeros_like(x)
    for k in range(n_steps):
        xi = (baseline + (k + 0.5) / n_steps * (x - baseline)).detach().requires_grad_(True)
        out = score(xi).sum()
        if out.requires_grad:
            out.backward()
            if xi.grad is not None:
                total += xi.grad
    return (x - baseline) * total / n_steps


def layer_output(cap, layer, images, ids, at_input: bool = False) -> torch.Tensor:
    """The (first tensor) output, or first input, of ``layer`` in one eval-mode forward."""
    if at_input:
        seen = []
        with hooked([layer], lambda m, args: seen.append(args[0].detach().clone()) if not seen else None, pre=True), \
                torch.no_grad():
            cap.logits(images, ids)
        return seen[0]
    with captured_outputs({"layer": layer}) as out, torch.no_grad():
        cap.logits(images, ids)
    o = out["layer"][0]
    return o[0] if isinstance(o, (tuple, list)) else (o.last_hidden_state if hasattr(o, "last_hidden_state") else o)


@register_check
@dataclass
class Attribution(Check):
    name = "attribution"
    catches = "generated words owing nothing to the image (Integrated Gradients image share ~0)"
    cheap = False
    n_steps: int = 16
    min_image_share: float = 0.02

    def run(self, s: Subject):
        try:
            import captum.attr  # noqa: F401
        except ImportError:  # pragma: no cover - captum is a core dependency
            return self.skip("captum is not installed")
        learned = learned_of(s)
        cap, images, captions, source = learned
        if learned.unlearned:  # no verdict on a copy that did not learn
            return self.finding(Status.WARN, learned.inconclusive(), {"learned_loss": learned.loss, "blind_floor": learned.floor})
        img = images[:1]
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            ids = cap.generate(img, max_len=cap.spec.max_len)
        n_words = len(cap.strip(ids)[0]) + 1  # words plus EOS
        n_words = min(n_words, ids.shape[1] - 1)
        if n_words < 1:
            return self.skip("the model generated an empty caption")
        with seeded(s.seed), in_mode(cap.model, False):
            emb_name, emb = token_embedding(cap, img, ids)
        image_layer = cap.image_module()
        gx = input_grad(cap, lambda c, x: sum(_logp(c, x, ids, t) for t in range(n_words)), img, train=False, seed=s.seed)
        at = "pixels"
        if gx is None or not bool(gx.abs().sum() > 0):
            if image_layer is None or image_layer is cap.model:
                return self._no_gradient_path(s, cap, img, ids, "pixels get no gradient and no image_module is declared")
            side = "output" if _plain_output(cap, image_layer, img, ids) else "input"
            at = f"the {side} of {cap.spec.image_module!r} (pixels get no gradient)"
        shares = self._shares(s, cap, img, ids, n_words, emb, image_layer, at)
        if shares is None:
            return self._no_gradient_path(s, cap, img, ids, f"{cap.spec.image_module!r} is never called")
        img_shares, pixel_maps = shares
        return self._verdict(s, learned, cap, img, ids, n_words, emb, at, img_shares, pixel_maps)

    def _shares(self, s, cap, img, ids, n_words, emb, image_layer, at):
        """``(image share per word, pixel maps)`` by captum, or by ``.backward()`` on a copy where autograd.grad
        is refused; None when the image module is never called."""
        try:
            with seeded(s.seed), in_mode(cap.model, False):
                return self._attribute(cap, img, ids, n_words, emb, image_layer, at, captum=True)
        except AssertionError as e:  # captum's layer hook never fired: the image module is not called
            if "did not obtain any outputs" not in str(e):
                raise
            return None
        except RuntimeError as e:
            if not (reentrant_refusal(e) or _inplace_on_leaf(e)):
                raise
            # Reentrant checkpointing refuses autograd.grad, and captum's layer hook hands the model a
            # leaf that in-place code cannot add to: the same sums through .backward() on a copy.
            twin = cap.with_model(copy.deepcopy(cap.model))
            names = dict((m, n) for n, m in cap.model.named_modules())
            emb2 = twin.submodule(names[emb]) if emb is not None else None
            layer2 = twin.submodule(cap.spec.image_module) if at != "pixels" else None
            with seeded(s.seed), in_mode(twin.model, False):
                return self._attribute(twin, img, ids, n_words, emb2, layer2, at, captum=False)

    def _verdict(self, s, learned, cap, img, ids, n_words, emb, at, img_shares, pixel_maps):
        source = learned.source
        if at != "pixels" and max(img_shares) == 0.0:
            return self._no_gradient_path(s, cap, img, ids, f"neither the pixels nor the output of "
                                                            f"{cap.spec.image_module!r} get a gradient")
        overall = sum(img_shares) / len(img_shares)
        metrics = {"image_share": overall, "image_share_min": min(img_shares), "image_share_max": max(img_shares)}
        words = [learned.decode([w]) for w in cap.strip(ids)[0]] + ["<eos>"]
        artifacts = {"image_share_per_word": list(zip(words[:n_words], img_shares)), "source": source}
        if pixel_maps:
            artifacts["pixel_maps"] = [(p / p.max().clamp_min(1e-12)).cpu() for p in pixel_maps]
            artifacts["map_image"] = cap.pixels(img)[0]
        note = "" if emb is not None else " (no token embedding is called with the caption ids: image attribution only)"
        if at != "pixels":
            note += f"; attributed at {at}"
        if overall < self.min_image_share:
            return self.finding(
                Status.FAIL,
                f"generated words owe {overall:.1%} of their attribution to the image ({source}){note}",
                metrics,
                "The words come from the caption prefix alone: the image does not reach the decoder in a way "
                "that matters. See image_ablation, pretrained_guard and gradient_flow for where it is lost.", artifacts,
                location=where_image_dies(cap, learned.images, learned.captions, s.seed),
            )
        return self.finding(
            Status.PASS, f"image share of attribution {overall:.0%} (per word {min(img_shares):.0%}-{max(img_shares):.0%}){note}",
            metrics, artifacts=artifacts,
        )

    def _attribute(self, cap, img, ids, n_words, emb, image_layer, at, captum: bool):
        """Per word: the image's share of |attribution| (pixels or ``image_layer`` output) against
        the caption prefix's (token embedding output), plus the pixel maps for the plot."""
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        base_ids = ids.clone()
        base_ids[:, 1:] = cap.spec.pad_id
        # A module returning a tuple, dict or ModelOutput (a DETR backbone's (features, positions), a
        # vision tower's dict) is attributed at its input instead: captum's layer hooks take tensors.
        at_input = at.startswith("the input")
        if not captum:  # layer outputs on the input and on its baseline, for ig_by_backward
            emb_out = (layer_output(cap, emb, img, ids), layer_output(cap, emb, img, base_ids)) if emb is not None else None
            if at != "pixels":
                img_out = (layer_output(cap, image_layer, img, ids, at_input),
                           layer_output(cap, image_layer, torch.zeros_like(img), ids, at_input))
        shares, maps = [], []
        for t in range(n_words):
            if at == "pixels" and captum:
                ig = IntegratedGradients(lambda x: _logp(cap, x, ids, t))
                a_img = _unused_is_zero(lambda: ig.attribute(img.clone(), baselines=torch.zeros_like(img), n_steps=self.n_steps), img)
            elif at == "pixels":
                a_img = ig_by_backward(lambda x: _logp(cap, x, ids, t), img, torch.zeros_like(img), self.n_steps)
            elif captum:
                lig_img = LayerIntegratedGradients(lambda x: _logp(cap, x, ids, t), image_layer)
                a_img = _unused_is_zero(lambda: lig_img.attribute(img.clone(), n_steps=self.n_steps,
                                                                  attribute_to_layer_input=at_input), None)
                a_img = a_img[0] if isinstance(a_img, (tuple, list)) else a_img
                a_img = a_img if a_img is not None else torch.zeros(1)
            else:
                a_img = ig_by_backward(lambda o: _logp_with(cap, image_layer, o, img, ids, t, at_input), img_out[0],
                                       img_out[1], self.n_steps)
            txt_mass = 0.0
            if emb is not None:
                if captum:
                    lig = LayerIntegratedGradients(lambda i, x: _logp(cap, x.expand(i.shape[0], -1, -1, -1), i, t), emb)
                    a_txt = _unused_is_zero(lambda: lig.attribute(ids, baselines=base_ids, additional_forward_args=(img,),
                                                                  n_steps=self.n_steps), None)
                else:
                    a_txt = ig_by_backward(lambda o: _logp_with(cap, emb, o, img, ids, t), emb_out[0], emb_out[1], self.n_steps)
                # only the prefix the word may see counts
                txt_mass = 0.0 if a_txt is None else float(a_txt[:, : t + 1].abs().sum())
            img_mass = float(a_img.abs().sum())
            total = img_mass + txt_mass
            shares.append(img_mass / total if total > 0 else 0.0)
            if at == "pixels":
                maps.append(a_img[0].abs().sum(0).detach().cpu())
        return shares, maps

    def _no_gradient_path(self, s, cap, img, ids, why: str):
        """No gradient reaches the image: fail only when the words really do not depend on it
        (zeroing the image or swapping in another one leaves their log-probabilities unchanged)."""
        others = torch.cat([torch.zeros_like(img), s.images[1:2]]) if s.images.shape[0] > 1 else torch.zeros_like(img)
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            base = cap.logits(img, ids).float()
            moved = max(float(rel_diff(base, cap.logits(o[None], ids).float())) for o in others)
        metrics = {"image_share": 0.0, "max_rel_change_other_image": moved}
        if moved > tolerance(base, precision(s)):
            return self.finding(
                Status.SKIP, f"{why}, yet the words change with the image (relative {moved:.2g}): gradient attribution "
                "cannot measure this path; image_ablation judges it without gradients", metrics)
        return self.finding(
            Status.FAIL, f"generated words owe nothing to the image: {why}, and replacing the image leaves every "
            f"word's score unchanged (relative {moved:.1g})", metrics,
            "The image does not reach the decoder: features zeroed, detached into nothing, or the wrong variable "
            "passed. See image_ablation, pretrained_guard and gradient_flow for where it is lost.",
            location=where_image_dies(cap, learned_of(s).images, learned_of(s).captions, s.seed))
