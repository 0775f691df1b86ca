"""Does what generate() produced agree with the teacher-forced forward? Token by token, with near
ties told apart from disagreements.

Feeding generated ids back through ``forward`` gives, at every step, the forward's log-probabilities
for the next token given exactly the prefix generate() had. A correct greedy decoder picks the
forward's argmax; where two words are within numerical noise of each other, either pick is correct
(the decoder computes the same function at another sequence length and batch size, and the kernels
round differently). So each generated token is one of:

- ``argmax``: the forward's own top choice;
- ``tie``: not the top choice, but its log-probability is within the noise floor of the top one;
- ``disagreement``: the forward ranks another word higher by more than the noise floor.

The noise floor is measured in the same run (``noise_floor``): how far the forward's log-probabilities
move under perturbations that a correct model is invariant to and that decoding itself applies
(another batch size, another sequence length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..captioner import generated_ids
from ..hooks import hooked
from .probe import judged_mask, precision, tolerance
from ..state import in_mode, seeded

MIN_NOISE = 1e-5  # nats: below this, float32 log-softmax of logits of size ~10 cannot resolve a margin


@dataclass(frozen=True)
class Agreement:
    """Generated tokens against the forward's choices at real target positions."""

    n_tokens: int
    n_argmax: int
    n_ties: int
    noise: float
    margins: torch.Tensor  # (B, L-1): forward's top log-prob minus the generated token's (0 at argmax), nan off-caption
    disagrees: torch.Tensor  # (B,) True where some token of the caption is a disagreement
    first: Optional[tuple] = None  # (sample, step, margin) of the first disagreement
    logprobs: Optional[torch.Tensor] = None  # (B, L-1, V) the forward's log-probabilities over the ids
    total: Optional[torch.Tensor] = None  # (B,) the forward's log-probability of each caption (``sequence_logprob``)

    @property
    def n_disagreements(self) -> int:
        return self.n_tokens - self.n_argmax - self.n_ties

    @property
    def agreement(self) -> float:
        """Share of tokens that are the forward's choice or a tie with it."""
        return (self.n_argmax + self.n_ties) / max(self.n_tokens, 1)

    def describe_first(self) -> str:
        if self.first is None:
            return ""
        b, t, m = self.first
        return (f"first at sample {b}, step {t + 1}: forward ranks its own choice {m:.3g} nats above generate()'s "
                f"word (noise floor {self.noise:.1g})")


@torch.no_grad()
def forward_logprobs(cap, images: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """``(B, L-1, V)`` eval-mode log-probabilities of the teacher-forced forward over ``ids``."""
    with seeded(seed), in_mode(cap.model, False):
        return F.log_softmax(cap.logits(images, ids).float(), -1)


def agreement(cap, images: torch.Tensor, ids: torch.Tensor, seed: int, noise: float) -> Agreement:
    """Classify every generated token of ``ids`` (B, L) against the forward (see the module docstring)."""
    lp = forward_logprobs(cap, images, ids, seed)
    mask = cap.target_mask(ids)
    chosen = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    total = (chosen * mask).sum(1).cpu()
    margin = lp.max(-1).values - chosen  # >= 0
    is_max = (lp.argmax(-1) == ids[:, 1:]) | (margin <= 0)
    tie = ~is_max & (margin <= noise)
    bad = mask & ~is_max & ~tie
    first = None
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        first = (b, t, float(margin[b, t]))
    return Agreement(int(mask.sum()), int((is_max & mask).sum()), int((tie & mask).sum()), noise,
                     torch.where(mask, margin, torch.full_like(margin, float("nan"))).cpu(), bad.any(1).cpu(), first,
                     lp, total)


@torch.no_grad()
def noise_floor(cap, images: torch.Tensor, captions: torch.Tensor, seed: int, dtype=None) -> float:
    """Largest change of the forward's log-probabilities at real positions when the same batch runs in
    halves (another batch size) and with one more padding column (another sequence length), in eval
    mode: the rounding a correct decoder's steps see. At least ``MIN_NOISE``, and at least the relative
    tolerance of the precision the forward computes in (``dtype``, see ``probe.compute_dtype``) times the
    largest logit: a bf16 autocast region rounds differently for other shapes even where this batch's
    halves happen to agree bit for bit."""
    def lp(x, c):
        return forward_logprobs(cap, x, c, seed)

    with seeded(seed), in_mode(cap.model, False):
        logits = cap.logits(images, captions).float()
    base = F.log_softmax(logits, -1)
    judged = judged_mask(cap, captions)[..., None]
    B = images.shape[0]
    moved = 0.0
    if B > 1:
        h = B // 2
        halves = torch.cat([lp(images[:h], captions[:h]), lp(images[h:], captions[h:])])
        moved = max(moved, float(torch.nan_to_num((base - halves).abs() * judged).max()))
    longer = torch.cat([captions, torch.full_like(captions[:, :1], cap.spec.pad_id)], 1)
    moved = max(moved, float(torch.nan_to_num((base - lp(images, longer)[:, : base.shape[1]]).abs() * judged).max()))
    scale = float((logits.abs() * judged).max())
    return max(moved, MIN_NOISE, tolerance(base, dtype or cap.dtype) * scale)


def subject_noise_floor(s, cap, images, captions) -> float:
    """``noise_floor`` for one captioner and batch of a subject, measured once."""
    return s.measured(("noise_floor", id(cap.model), id(images)),
                      lambda: noise_floor(cap, images, captions, s.seed, precision(s)))


def sequence_logprob(cap, images: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """``(B,)`` the forward's total log-probability of each caption in ``ids`` (BOS excluded, EOS included)."""
    lp = forward_logprobs(cap, images, ids, seed)
    return (lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * cap.target_mask(ids)).sum(1).cpu()


# ---- where generate() runs the decoder -------------------------------------------------------------
# ---- generate()'s own step logits against the forward's ------------------------------------------------
def _token_embeddings(cap) -> list:
    """The embeddings that can embed the caption vocabulary."""
    return [m for m in cap.model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings >= cap.spec.vocab_size]


def _generate_hooked(cap, images, max_len, seed, embeds, on_embed, on_output):
    """generate() in eval mode, seeded, with ``on_embed`` before every call of ``embeds`` and ``on_output``
    after every module's forward (the model's own top level left out)."""
    with hooked(embeds, on_embed, pre=True), hooked([m for m in cap.model.modules() if m is not cap.model], on_output), \
            seeded(seed), in_mode(cap.model, False):
        return cap.generate(images, max_len=max_len)


@dataclass(frozen=True)
class StepCheck:
    """generate()'s step logits compared with the forward's at the same prefix (decoders that run the
    whole prefix each step: the calls of the token embedding with a (rows, t) prefix starting at BOS)."""

    n_steps: int  # decoding steps whose prefix and logits were seen
    worst: float  # largest |difference| of log-probabilities at the best-matching image, over the steps
    at: Optional[tuple] = None  # (call index, prefix length) of the worst step


@torch.no_grad()
def step_logits_check(cap, images: torch.Tensor, max_len: int, seed: int) -> Optional[StepCheck]:
    """Run generate() on ``images`` with hooks that read, at every step, the prefix the decoder embeds
    and the logits its output layer returns for it; run the forward on the same prefixes and compare the
    last position's log-probabilities. Rows are matched to the image that explains them best (a beam
    search decodes one image's beams at a time, or all of them interleaved). None when generate() never
    embeds a whole prefix (a KV cache or a recurrent step sees one token at a time)."""
    V, bos = cap.spec.vocab_size, cap.spec.bos_id
    embeds = _token_embeddings(cap)
    if not embeds:
        return None
    calls: list = []  # [prefix (rows, t), logits (rows, V) or None]

    def on_embed(m, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and x.shape[1] >= 1 \
                and bool((x[:, 0] == bos).all()):
            calls.append([x.detach().clone(), None])

    def on_output(m, args, out):
        if calls and isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() == 3 \
                and out.shape[-1] == V and out.shape[:2] == calls[-1][0].shape:
            calls[-1][1] = out[:, -1].detach().float()

    _generate_hooked(cap, images, max_len, seed, embeds, on_embed, on_output)
    seen = [(p, lg) for p, lg in calls if lg is not None]
    # A decoder that runs the whole prefix grows it by one token a call; a cache sees length 1 throughout.
    if len(seen) < 2 or max(p.shape[1] for p, _ in seen) < 2:
        return None
    worst, at = 0.0, None
    for k, (prefix, logits) in enumerate(seen):
        rows = prefix.shape[0]
        gen_lp = F.log_softmax(logits, -1)  # (rows, V)
        n = images.shape[0]  # every row against every image, in one forward: the best match explains the row
        x = images.repeat_interleave(rows, 0)  # (n * rows, 3, H, W): image j for rows j*rows .. j*rows+rows-1
        inp = torch.cat([prefix, prefix[:, -1:]], 1).repeat(n, 1)  # one more column: T-1 models score the last step
        with seeded(seed), in_mode(cap.model, False):
            fwd = F.log_softmax(cap.logits(x, inp)[:, prefix.shape[1] - 1].float(), -1).view(n, rows, -1)
        best = (fwd - gen_lp[None]).abs().amax(-1).min(0).values.cpu()  # (rows,)
        w = float(best.max())
        if w > worst:
            worst, at = w, (k, int(prefix.shape[1]))
    return StepCheck(len(seen), worst, at)


@torch.no_grad()
def stepwise_check(cap, images: torch.Tensor, max_len: int, seed: int, tol: float) -> Optional[dict]:
    """For decoders that feed generate() one token per step (a recurrent cell, a KV cache): follow which
    prefix each row's step logits belong to, and check that the captions generate() returns are made of
    prefixes it scored.

    At each step the hooks read the tokens the embedding receives (one per row) and the logits the output
    layer returns; a row's prefix is the earlier row's prefix (and the image) that, extended by its token,
    makes the forward give those logits. A row no earlier prefix explains means the step ran from some
    other state (KV positions stuck at 0); a returned caption that is not one of the followed prefixes was
    assembled from rows whose state did not go with them (a beam search that reorders its sequences but
    keeps its (h, c) by slot). Every (image, prefix) within ``tol`` of a row's logits is kept as what that
    row may be (an untrained copy may give several images the same first step). Returns None when
    generate() embeds whole prefixes (``step_logits_check``)."""
    V, bos = cap.spec.vocab_size, cap.spec.bos_id
    embeds = _token_embeddings(cap)
    calls: list = []

    def on_embed(m, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and (x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1)):
            calls.append([x.detach().reshape(-1).clone(), None])

    def on_output(m, args, out):
        if calls and isinstance(out, torch.Tensor) and out.is_floating_point() and out.shape[-1] == V \
                and out.shape[0] == calls[-1][0].shape[0] and out.dim() in (2, 3):
            calls[-1][1] = out.reshape(out.shape[0], -1, V)[:, -1].detach().float()

    out = _generate_hooked(cap, images, max_len, seed, embeds, on_embed, on_output)
    seen = [(tok, lg) for tok, lg in calls if lg is not None]
    if len(seen) < 2:
        return None
    n = images.shape[0]
    followed: set = set()  # (image, prefix tuple) whose step logits generate() computed
    explained: set = set()  # what the previous step's rows may continue: every (image, prefix) within tolerance
    worst, first = 0.0, None
    eos = cap.spec.eos_id
    filler = next(t for t in range(V) if t not in cap.spec.special_ids)
    for k, (tok, logits) in enumerate(seen):
        if bool((tok == bos).all()):  # a decoding (one image's beams, or the batch) starts
            base = [(j, ()) for j in range(n)]
        elif not explained:  # the decoding does not start from BOS as this model's captions do: cannot follow it
            return None
        else:
            base = sorted(explained)
        # A row continuing a finished caption (EOS already in its prefix) is padding: its logits mean nothing.
        base_live = [(j, p) for j, p in base if eos not in p[1:]]
        if not base_live:
            explained = {(j, p + (int(t),)) for t in tok for j, p in base}
            continue
        flat, gaps = _step_gaps(cap, images, seed, tok, logits, base_live, filler)
        explained = set()
        for r in range(len(tok)):
            ok = (gaps[r] <= tol).nonzero().flatten().tolist()
            best = int(gaps[r].argmin())
            gap = float(gaps[r, best])
            if gap > worst:
                worst = gap
            if not ok and first is None:
                first = (k, r, gap)
            for c in (ok or [best]):
                explained.add(flat[r * len(base_live) + c])
        followed |= explained
    return {"steps": len(seen), "worst_gap": worst, "first": first, "stray_captions": _stray(cap, out, images, followed),
            "n": n}


def _step_gaps(cap, images, seed: int, tok, logits, base_live: list, filler: int) -> tuple:
    """Each live (image, prefix) extended by each row's token, run through the forward: ``(candidates,
    gaps)`` with ``gaps[r, c]`` the largest log-probability gap between row ``r``'s step logits and
    candidate ``c``'s forward logits."""
    flat = [(j, p + (int(t),)) for t in tok for j, p in base_live]
    width = max(len(p) for _, p in flat) + 1
    # Each prefix, then one placeholder word (decoders that take their lengths from padding, and models
    # returning T-1 logits, still score the step after the prefix), then padding.
    ids = torch.tensor([list(p) + [filler] + [cap.spec.pad_id] * (width - len(p) - 1) for _, p in flat],
                       device=images.device)
    x = images[torch.tensor([j for j, _ in flat], device=images.device)]
    with seeded(seed), in_mode(cap.model, False):
        lp = F.log_softmax(cap.logits(x, ids).float(), -1)
    pos = torch.tensor([len(p) - 1 for _, p in flat], device=images.device)
    fwd = lp[torch.arange(len(flat), device=images.device), pos].view(len(tok), len(base_live), -1)
    return flat, (fwd - F.log_softmax(logits, -1)[:, None]).abs().amax(-1).cpu()  # (rows, candidates)


def _stray(cap, out, images, followed: set) -> int:
    """Returned captions that are no prefix generate() scored from its own state. (A caption cut at
    max_len never embedded its last word: then its prefix up to the word before.)"""
    n, bos = images.shape[0], cap.spec.bos_id
    ids = generated_ids(out, n, cap.spec.pad_id, images.device)
    ended = [bool((r[1:] == cap.spec.eos_id).any()) for r in ids]
    return sum(1 for row, e in zip(cap.strip(ids), ended)
               if (row if e else row[:-1]) and not any((j, (bos,) + tuple(row if e else row[:-1])) in followed
                                                       for j in range(n)))
