"""decoding_consistency: what generate() produces must agree with the teacher-forced forward, for
any decoding, on the training batch and on images it never saw.

Judged on a model whose captions depend on the image (the learned copy, or the trained model as
given), in the precision it runs in. Four comparisons:

1. **Against the forward.** Every generated caption is fed back through ``forward``. A caption is
   consistent when each of its tokens is the forward's argmax or within the noise floor of it (a
   near tie, ``capdiag.measure.agreement``), or when it is a search result that neither capdiag's own greedy
   decoding nor its own beam-k search through forward (``Captioner.beam``) beats both in total and in
   mean log-probability per token (so it is not worse under any length penalty). A caption is
   inconsistent when one of those beats it that way *and* it holds a word the forward ranks below
   the ``beam`` best at that step: no correct search of that width picks such a word (a search's
   own errors stay inside the top k). A beam search that does not reorder its recurrent state, or
   runs the decoder without its causal mask, does.
2. **Alone against in the batch.** Each image decoded alone must get the caption it gets inside the
   batch (batched stopping on the first EOS of any sample, padding side, cross-talk in decoding); a
   difference that starts at a near tie of the forward is not one.
3. **State between calls.** Decoding other images first must not change the captions of a batch (an
   encoder output cached on ``self`` in generate() and reused while the batch size matches).
4. **Unseen inputs.** 1 and 2 also run on noise images, colour-permuted images and blends of training
   images: a confident copy hides reorder bugs on the captions it memorized.
5. **Step logits.** Where generate() runs the decoder over the whole prefix each step (its token
   embedding sees a (rows, t) prefix from BOS), hooks read that prefix and the logits the output layer
   returns for it, and the forward runs on the same prefix: a beam search that calls the decoder without
   its causal mask differs by nats, a correct one by rounding (at most ``step_noise_factor`` noise floors).
   Where it feeds one token per step (a recurrent cell, a KV cache), each row's prefix is followed: the
   earlier prefix that, extended by the row's token, makes the forward give the row's logits. A returned
   caption that is not a followed prefix was assembled from rows whose state did not go with them (two
   or more fail). A step no prefix explains is recorded (``max_step_logprob_gap``) but judged through 1:
   following prefixes through recurrent decoders that pad finished rows is not exact enough yet to fail
   on alone. Where the step evidence is clean, captions scored below capdiag's own searches (1) are the
   search's own errors, not a failure; the comparison of 1 decides where no clean step could be read.

A failing finding names the first decoding step where generate() departs from the forward and the
line of generate()'s loop that runs the decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from capdiag.check import Check, Subject
from capdiag.finding import Status
from capdiag.measure.ablation import generated
from capdiag.measure.agreement import (StepCheck, agreement, sequence_logprob, step_logits_check, stepwise_check,
                                       subject_noise_floor)
from capdiag.measure.localize import where_image_dies
from capdiag.measure.origins import carried_state, loop_location, stuck_positions
from capdiag.measure.trace import trace_call
from capdiag.measure.training import learned_of
from capdiag.registry import register_check
from capdiag.state import in_mode, preserved_attributes, seeded


def _ends(cap, row: torch.Tensor) -> bool:
    """Whether a generated row (BOS first) holds an EOS after BOS."""
    return bool((row[1:] == cap.spec.eos_id).any())


def unseen_inputs(images: torch.Tensor, seed: int, n: int = 16) -> torch.Tensor:
    """Images the copy never trained on: noise, colour-permuted training images, blends of two."""
    g = torch.Generator().manual_seed(seed + 11)
    k = max(1, n // 3)
    noise = torch.randn((k,) + images.shape[1:], generator=g).to(images)
    permuted = images[:k, [2, 0, 1]]
    m = max(1, min(n - 2 * k, images.shape[0]))
    blends = 0.5 * (images[:m] + images.roll(1, 0)[:m])
    return torch.cat([noise, permuted, blends])


@dataclass
class Judged:
    """Rows of one input set whose generated caption is not explained by the forward."""

    name: str
    n: int
    bad_rows: list = field(default_factory=list)
    first: tuple = None  # (row, step, margin) of the first token that departs
    alone: list = field(default_factory=list)  # rows whose caption alone differs beyond a tie
    greedy_like: bool = True  # every generated token is the forward's choice or a near tie


@register_check
@dataclass
class DecodingConsistency(Check):
    name = "decoding_consistency"
    subjects = ("captioner", "prompted")  # prompted: capdiag.prompted.verdicts.decoding
    calls = "generate"
    catches = "generate() disagreeing with the teacher-forced forward (beam state, masks, image or state missing at inference, batched stopping)"
    cheap = False
    beam: int = 3  # the widest search generate() is assumed to run: capdiag's own beam width, and the rank
    # under the forward below which no correct search of that width picks a word
    max_bad_fraction: float = 0.1  # of the judged captions that may be unexplained (one in ten)
    max_alone: int = 4  # images decoded alone per input set
    step_noise_factor: float = 10.0  # step logits must differ from the forward's by this many noise floors

    @staticmethod
    def _origin(cap, images, captions, seed: int, carried: int):
        """A traced cause in generate(): state stored by one call and read by the next, position ids that
        do not advance with the step, or a loop that never reads the image (what it feeds the decoder
        instead)."""
        if carried:
            n = min(images.shape[0], 4)
            where = carried_state(cap, (unseen_inputs(images, seed)[:n], captions[:n]), (images[:n], captions[:n]), True)
            if where is not None:
                return where
        gen = trace_call(cap, images, captions, seed=seed, generate=True)
        fwd = trace_call(cap, images, captions, seed=seed)
        return stuck_positions(gen, cap.model, fwd) or where_image_dies(cap, images, captions, seed, generate=True)

    def run(self, s: Subject):
        if s.kind == "prompted":
            from capdiag.prompted import verdicts

            return verdicts.decoding(self, s)
        if not s.captioner.has_generate:
            return self.skip("the model has no generate(); capdiag's own greedy decoding is consistent by construction")
        learned = learned_of(s)
        if learned.unlearned:  # no verdict on a copy that did not learn
            return self.finding(Status.WARN, learned.inconclusive(), {"learned_loss": learned.loss, "blind_floor": learned.floor})
        cap, images, captions, source = learned
        noise = subject_noise_floor(s, cap, images, captions)
        max_len = captions.shape[1] + 2
        sets = {"training images": images, "unseen images": unseen_inputs(images, s.seed)}
        judged, metrics = [], {"noise_floor": noise}
        for name, x in sets.items():
            ids = generated(s, cap, x, max_len) if x is images else self._generate(cap, x, max_len, s.seed)
            if ids.shape[1] < 2:
                return self.skip("generate() returned no tokens after BOS")
            j = self._against_forward(cap, x, ids, noise, s.seed, name)
            j.alone = self._alone(cap, x, ids, noise, max_len, s.seed, j.greedy_like)
            judged.append(j)
            metrics[f"unexplained_{name.split()[0]}"] = len(j.bad_rows) / j.n
            metrics[f"alone_differs_{name.split()[0]}"] = float(len(j.alone))
        carried = self._carried_state(cap, images, sets["unseen images"], max_len, s.seed)
        metrics["captions_changed_by_earlier_call"] = float(carried)
        steps = step_logits_check(cap, images[:4], max_len, s.seed)
        if steps is not None:
            metrics["max_step_logprob_gap"] = steps.worst
        else:  # one token per step: follow each row's prefix on training and noise images
            tol = self.step_noise_factor * noise
            followed = [stepwise_check(cap, x, max_len, s.seed, tol) for x in (images[:4], sets["unseen images"][:5])]
            followed = [f for f in followed if f is not None]
            if followed:
                metrics["max_step_logprob_gap"] = max(f["worst_gap"] for f in followed)
                metrics["stray_captions"] = float(sum(f["stray_captions"] for f in followed))
        return self._verdict(s, cap, images, captions, judged, steps, carried, metrics, source, max_len)

    # ---- measure -----------------------------------------------------------------------------
    @staticmethod
    def _generate(cap, x, max_len, seed):
        with torch.no_grad(), seeded(seed), in_mode(cap.model, False):
            return cap.generate(x, max_len=max_len)

    def _against_forward(self, cap, x, ids, noise, seed, name) -> Judged:
        agr = agreement(cap, x, ids, seed, noise)
        j = Judged(name, x.shape[0])
        suspects = [i for i in range(x.shape[0]) if bool(agr.disagrees[i])]
        j.greedy_like = not suspects
        if not suspects:
            return j
        # capdiag's own searches through the forward: greedy and beam-k. A generated caption is clearly
        # worse when one of them beats it both in total and in mean log-probability per token: then it is
        # worse under every length penalty between none and full normalization, whatever the search's
        # own objective (a dominance at both ends holds for every L**a, 0 <= a <= 1, in between).
        def length(t):  # real target tokens per caption
            return cap.target_mask(t).sum(1).clamp_min(1).cpu().float()

        gen_total, gen_len = agr.total, length(ids)
        greedy = cap.greedy(x, ids.shape[1])
        beams = cap.beam(x, self.beam, ids.shape[1])
        width = max(len(b) for b in beams)
        beam_ids = torch.tensor([b + [cap.spec.pad_id] * (width - len(b)) for b in beams], device=x.device)
        rivals = [(sequence_logprob(cap, x, r, seed), length(r)) for r in (greedy, beam_ids)]
        # A correct search of width k only ever extends a hypothesis by one of that hypothesis' k best
        # next words under the forward; a token ranked below them came from some other state.
        lp = agr.logprobs
        kth = lp.topk(min(self.beam, lp.shape[-1]), -1).values[..., -1]  # (B, L-1)
        chosen = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        beyond = ((chosen < kth - noise) & cap.target_mask(ids)).any(1).cpu()
        for i in suspects:
            g_tot, g_len = float(gen_total[i]), float(gen_len[i])
            dominated = any(float(t[i]) > g_tot + noise * g_len and float(t[i]) / float(n[i]) > g_tot / g_len + noise
                            for t, n in rivals)
            if dominated and bool(beyond[i]):
                j.bad_rows.append(i)
        if j.bad_rows:
            k = j.bad_rows[0]
            t = int(torch.nan_to_num(agr.margins[k], nan=0.0).gt(noise).nonzero()[0])
            j.first = (k, t, float(agr.margins[k, t]))
        return j

    def _alone(self, cap, x, ids, noise, max_len, seed, greedy_like: bool) -> list:
        """Rows whose caption decoded alone differs from the batch's where the batch cannot explain it:
        one of the two stops without EOS where the other goes on (a batch stopped by another sample's
        EOS), or, for a decoder that otherwise follows the forward's choices (``greedy_like``), one of the
        two departs from them. A search (a beam) can legitimately land elsewhere after a rounding-level
        change of one score: its captions are judged against the forward (``_against_forward``)."""
        batch = cap.strip(ids)
        out = []
        for i in range(min(x.shape[0], self.max_alone)):
            alone_ids = self._generate(cap, x[i:i + 1], max_len, seed)
            alone = cap.strip(alone_ids)[0]
            if alone == batch[i] and _ends(cap, alone_ids[0]) == _ends(cap, ids[i]):
                continue
            t = next((k for k, (a, b) in enumerate(zip(alone, batch[i])) if a != b), min(len(alone), len(batch[i])))
            cut = (t >= len(batch[i]) and not _ends(cap, ids[i])) or (t >= len(alone) and not _ends(cap, alone_ids[0]))
            if cut:
                out.append(i)
                continue
            if not greedy_like:  # a search may land elsewhere after a rounding-level change of one score
                continue
            # A greedy decoder: both captions must follow the forward's choices; where both do and still part,
            # the two words are within the noise floor of each other (a near tie). One that does not is the bug.
            pair = [alone_ids[0], ids[i]]
            width = max(len(r) for r in pair)
            both = torch.stack([torch.cat([r, r.new_full((width - len(r),), cap.spec.pad_id)]) for r in pair])
            departs = agreement(cap, x[i:i + 1].expand(2, *x.shape[1:]), both, seed, noise).disagrees
            if bool(departs.any()):
                out.append(i)
        return out

    @staticmethod
    def _carried_state(cap, images, other, max_len, seed) -> int:
        """Captions of ``images`` that change when generate() ran on ``other`` images (of the same batch
        size) just before, with the model's attributes kept between the two calls as a user's loop keeps them."""
        n = min(images.shape[0], other.shape[0])
        x, y = images[:n], other[:n]
        fresh = cap.strip(DecodingConsistency._generate(cap, x, max_len, seed))
        stateless = cap.stateless
        try:
            cap.stateless = False
            with preserved_attributes(cap.model):  # the user's (or the copy's) state comes back afterwards
                DecodingConsistency._generate(cap, y, max_len, seed)
                after = cap.strip(DecodingConsistency._generate(cap, x, max_len, seed))
        finally:
            cap.stateless = stateless
        return sum(a != b for a, b in zip(fresh, after))

    # ---- judge and explain -----------------------------------------------------------------------
    def _verdict(self, s, cap, images, captions, judged, steps: Optional[StepCheck], carried, metrics, source, max_len):
        problems, evidence = [], []
        noise = metrics["noise_floor"]
        gap, stray = metrics.get("max_step_logprob_gap", 0.0), metrics.get("stray_captions", 0.0)
        if stray >= 2:
            problems.append(f"{int(stray)} returned captions are not sequences whose steps generate() computed: the "
                            "sequences were reordered without their state")
            evidence.append("first symptom: a returned caption whose last step was never run from its own prefix")
        if steps is not None and steps.worst > self.step_noise_factor * noise:
            k, t = steps.at
            problems.append(f"the logits generate() computes at its steps differ from the forward's at the same prefix "
                            f"by up to {steps.worst:.3g} nats (noise floor {noise:.1g})")
            evidence.append(f"first symptom: decoder call {k + 1} of generate(), prefix of {t} tokens: its log-probabilities "
                            f"differ from the forward's by {steps.worst:.3g}")
        # Step evidence, where hooks could read it, proves each step ran the forward's computation on its own
        # prefix: then captions the forward scores lower than capdiag's searches are the search's own errors.
        steps_clean = "max_step_logprob_gap" in metrics and gap <= self.step_noise_factor * noise and stray < 2
        for j in judged:
            if steps_clean:
                metrics[f"search_errors_{j.name.split()[0]}"] = float(len(j.bad_rows))
                continue
            if len(j.bad_rows) >= 2 and len(j.bad_rows) > self.max_bad_fraction * j.n:
                problems.append(f"on {j.name}, {len(j.bad_rows)} of {j.n} captions are ones the forward scores lower "
                                f"than its own greedy and beam-{self.beam} searches, departing from its choices")
                k, t, m = j.first
                evidence.append(f"first symptom: on {j.name}, image {k}, decoding step {t + 1}: the forward ranks its "
                                f"own choice {m:.3g} nats above generate()'s word")
        for j in judged:
            if j.alone:
                problems.append(f"on {j.name}, {len(j.alone)} image(s) decoded alone get another caption than inside "
                                f"the batch (first: image {j.alone[0]})")
                evidence.append(f"first symptom: image {j.alone[0]} of the {j.name} decoded alone parts from its "
                                "in-batch caption beyond a near tie")
        if carried:
            problems.append(f"{carried} captions change when generate() decoded other images just before: state is "
                            "carried between calls")
            evidence.append("first symptom: the same images get other captions after a call on other images")
        if not problems:
            n = sum(j.n for j in judged)
            return self.finding(Status.PASS, f"generate() agrees with the teacher-forced forward on {n} images "
                                f"(training and unseen), alone and in the batch, call after call ({source})", metrics)
        evidence.sort(key=lambda e: "decoding step" not in e)  # the first departing step, when one was seen
        where = self._origin(cap, images, captions, s.seed, carried) or loop_location(cap, images, evidence[0], max_len)
        return self.finding(
            Status.FAIL, "generate() is inconsistent with the forward: " + "; ".join(problems) + f" ({source})", metrics,
            "generate() runs the decoder differently from forward(): compare the masks (a causal mask in beam "
            "search), the image features passed at every step, the start token, how recurrent state or caches are "
            "reordered with the beams and positioned, per-sample stopping (a done mask, not `if done.any(): break`), "
            "and state kept on self between calls.", location=where)
