"""loss_sanity: the model file's own ``loss_fn(logits, captions)`` behaves like a caption loss.

Four properties: padding is ignored (appending pad positions with arbitrary logits leaves
the loss unchanged), the reduction is a mean (duplicating the batch leaves it unchanged),
it takes logits (near-perfect logits give a loss far below the loss of uniform logits;
softmax applied twice keeps it near ln V), and the EOS target counts (scoring it wrong raises
the loss). The last one catches ``ignore_index=pad_id`` in GPT-2 and CLIP recipes, where pad
== eos: the model is never taught to stop, and its captions run to the length limit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from capdiag.captioner import extract_logits
from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.localize import function_location
from capdiag.registry import register_check
from capdiag.state import in_mode, seeded


@register_check
@dataclass
class LossSanity(Check):
    name = "loss_sanity"
    calls = "loss_fn"
    catches = "the training loss counting padding, dropping EOS (pad == eos), summing instead of averaging, or taking probabilities"
    rtol: float = 1e-3

    def run(self, s: Subject):
        cap = s.captioner
        fn = cap.loss_fn
        if fn is None:
            return self.skip("the model file defines no loss_fn(logits, captions)")
        images, captions = s.images, s.captions
        with torch.no_grad(), seeded(s.seed), in_mode(cap.model, False):
            logits = extract_logits(cap.call(images, captions)).float()
            base = float(fn(logits, captions))
            # 1. padding: append pad tokens and arbitrary logits for them
            k = 3
            pads = torch.full((captions.shape[0], k), cap.spec.pad_id, dtype=captions.dtype, device=captions.device)
            g = torch.Generator().manual_seed(s.seed)
            junk = (torch.randn(logits.shape[0], k, logits.shape[2], generator=g) * 5).to(logits)
            padded = float(fn(torch.cat([logits, junk], 1), torch.cat([captions, pads], 1)))
            # 2. reduction: the same batch twice
            doubled = float(fn(torch.cat([logits, logits]), torch.cat([captions, captions])))
            # 3. logits vs probabilities: near-perfect logits must score far below uniform ones
            V = logits.shape[-1]
            T_out = logits.shape[1]
            targets = captions[:, 1:]
            if T_out == captions.shape[1]:
                targets = torch.cat([targets, targets[:, -1:]], 1)
            perfect = torch.nn.functional.one_hot(targets[:, :T_out], V).float() * 8.0
            good = float(fn(perfect, captions))
            uniform = float(fn(torch.zeros_like(logits), captions))
            # 4. the EOS target: move the confident guess there to another token
            eos_at = cap.lengths(captions) - 2  # logits index scoring each caption's EOS
            rows = torch.nonzero((eos_at >= 0) & (eos_at < T_out)
                                 & (captions.gather(1, (eos_at + 1).clamp(0, captions.shape[1] - 1)[:, None])[:, 0]
                                    == cap.spec.eos_id)).flatten()
            eos_wrong = None
            if len(rows):
                wrong = perfect.clone()
                other = (cap.spec.eos_id + 1) % V
                wrong[rows, eos_at[rows]] = torch.nn.functional.one_hot(torch.tensor(other), V).float().to(wrong) * 8.0
                eos_wrong = float(fn(wrong, captions))
        metrics = {"loss": base, "loss_extra_padding": padded, "loss_batch_doubled": doubled,
                   "loss_confident_logits": good, "loss_uniform_logits": uniform}
        if eos_wrong is not None:
            metrics["loss_confident_logits_eos_wrong"] = eos_wrong
        problems = []
        if abs(padded - base) > self.rtol * max(abs(base), 1e-6):
            problems.append(f"padding counts: appending pad positions moves the loss from {base:.4f} to {padded:.4f}")
        if abs(doubled - base) > self.rtol * max(abs(base), 1e-6):
            problems.append(f"not a mean: duplicating the batch moves the loss from {base:.4f} to {doubled:.4f}")
        if uniform > 0 and good > 0.5 * uniform:
            problems.append(f"near-perfect logits still score {good:.2f} vs {uniform:.2f} for uniform ones: "
                            "probabilities, not logits, reach the cross entropy (softmax applied twice)")
        if eos_wrong is not None and uniform > 0 and eos_wrong - good < 1e-3 * uniform:
            problems.append(f"EOS is not a target: scoring every EOS wrong leaves the loss at {eos_wrong:.4f} "
                            f"(vs {good:.4f}); with pad == eos (id {cap.spec.eos_id}), ignore_index=pad_id drops "
                            "EOS too, so the model never learns to stop")
        if problems:
            return self.finding(
                Status.FAIL, "; ".join(problems), metrics,
                "Use F.cross_entropy(logits, targets, ignore_index=pad_id) (or mask by the real-token mask) with "
                "the default mean reduction, on raw logits; with pad == eos, mask by position after the first "
                "EOS rather than by id.",
                location=function_location(fn, (logits, captions), "computes the loss"),
            )
        return self.finding(Status.PASS, "loss_fn ignores padding, averages, and takes logits", metrics)
