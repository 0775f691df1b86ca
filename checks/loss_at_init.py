"""loss_at_init: an untrained captioner's loss should start near ln(vocab).

Catches huge output-layer init, saturated softmax, logits fed through softmax twice, and
NaN/inf in the forward pass. A trained or pretrained model scores below ln(V): that passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.gradient_path import first_nonfinite, largest_gain
from capdiag.measure.localize import locate, who_wrote
from capdiag.measure.probe import first_nonfinite_module, logits_in, untrained_batchnorm
from capdiag.registry import register_check
from capdiag.measure.trace import trace_call


def tied_embeddings(model: torch.nn.Module) -> bool:
    """Whether some nn.Linear shares its weight with an nn.Embedding (input/output weight tying)."""
    embs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return any(isinstance(m, torch.nn.Linear) and id(m.weight) in embs for m in model.modules())


@register_check
@dataclass
class LossAtInit(Check):
    name = "loss_at_init"
    catches = "huge or saturated init (loss far above ln V), NaN/inf in the forward pass"
    fail_excess: float = 2.0  # nats above ln(V) (or 30 % of ln V, whichever is larger) that fail
    warn_excess: float = 0.7

    def run(self, s: Subject):
        cap = s.captioner
        V = cap.spec.vocab_size
        ln_v = math.log(V)
        metrics = {"ln_vocab": ln_v}
        for train in (False, True):
            tag = "train" if train else "eval"
            logits = logits_in(cap, s.images, s.captions, train, s.seed, check_finite=False)
            loss = float(cap.loss_from_logits(logits, s.captions))
            metrics[f"loss_{tag}"] = loss
            if not math.isfinite(loss):
                where = first_nonfinite_module(cap, s.images, s.captions, train, s.seed)
                return self.finding(
                    Status.FAIL, f"loss is {loss} in {tag} mode; first non-finite output: {where}", metrics,
                    "Look for log of zero/negative values, division by zero, overflow in half precision, "
                    "or uninitialized (torch.empty) weights in that module.",
                    location=locate(first_nonfinite(trace_call(cap, s.images, s.captions, train, s.seed)), cap.model,
                                    "first operation whose output is NaN/inf while its inputs are finite"),
                )
            mask = cap.target_mask(s.captions)
            maxp = torch.softmax(logits, -1).amax(-1)[mask].mean()
            metrics[f"mean_max_prob_{tag}"] = float(maxp)
            # Tied input/output embeddings score each position's own input token highest at init.
            copies = logits.argmax(-1) == s.captions[:, :-1]
            metrics[f"fraction_predicting_input_token_{tag}"] = float(copies[mask].float().mean())
        # Untrained BatchNorm statistics leave eval mode unnormalized (a random ResNet101 reaches
        # losses of 1e4 there); judge such a model in train mode, as it will be trained.
        bn_untrained = untrained_batchnorm(cap.model)
        metrics["batchnorm_stats_untrained"] = float(bn_untrained)
        loss = metrics["loss_train"] if bn_untrained else max(metrics["loss_eval"], metrics["loss_train"])
        excess = loss - ln_v
        metrics["excess_over_ln_vocab"] = excess
        tag = "train" if bn_untrained or metrics["loss_train"] >= metrics["loss_eval"] else "eval"
        if excess > max(self.fail_excess, 0.3 * ln_v) and tied_embeddings(cap.model) \
                and metrics[f"fraction_predicting_input_token_{tag}"] > 0.5:
            return self.finding(
                Status.WARN,
                f"loss at init {loss:.2f} is {excess:.1f} nats above ln(V)={ln_v:.2f} because the tied output layer "
                f"scores each input token itself ({metrics[f'fraction_predicting_input_token_{tag}']:.0%} of positions "
                "predict their own input token)", metrics,
                "Expected at init for tied input/output embeddings (the residual stream still holds the input "
                "embedding); training breaks the copy in a few steps. A smaller embedding init (std 0.02) or no "
                "sqrt(d) input scaling starts nearer ln V.",
            )
        if excess > max(self.fail_excess, 0.3 * ln_v):
            return self.finding(
                Status.FAIL,
                f"loss at init {loss:.2f} is {excess:.1f} nats above ln(V)={ln_v:.2f}: the model starts "
                f"overconfident (mean max softmax prob {max(metrics['mean_max_prob_eval'], metrics['mean_max_prob_train']):.2f})",
                metrics,
                "The output layer is initialized too large (or logits are scaled up). Use the default or a "
                "small-std init for the vocabulary projection; check custom init functions and logit scaling.",
                location=self._scaled_up(s, tag == "train"),
            )
        if excess > self.warn_excess:
            return self.finding(
                Status.WARN, f"loss at init {loss:.2f} is {excess:.1f} nats above ln(V)={ln_v:.2f}", metrics,
                "Slightly overconfident init; usually harmless, but check the output layer's init scale.",
            )
        below = " (below ln V: pretrained or already trained)" if excess < -0.5 else ""
        if bn_untrained and metrics["loss_eval"] - ln_v > max(self.fail_excess, 0.3 * ln_v):
            below += (f"; eval mode gives {metrics['loss_eval']:.3g} only because BatchNorm running statistics "
                      "are still at their initial values")
        return self.finding(Status.PASS, f"loss at init {loss:.2f}{' (train mode)' if bn_untrained else ''} vs ln(V)={ln_v:.2f}{below}", metrics)

    def _scaled_up(self, s: Subject, train: bool):
        """The operation that scales its input up the most on the way to the logits; when the model can be
        rebuilt, the user's line that last wrote that module's weights (a custom init, a ``.mul_``)."""
        cap = s.captioner
        op = largest_gain(trace_call(cap, s.images, s.captions, train, s.seed))
        where = locate(op, cap.model, "scales its input up the most on the way to the logits")
        if op is None or not op.module or s.rebuild is None:
            return where
        names = [f"{op.module}.{n}" for n, _ in cap.model.get_submodule(op.module).named_parameters()]
        return who_wrote(s.rebuild, op.module, names) or where
