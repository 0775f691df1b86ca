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

from .probe import judged_mask
from .state import in_mode, seeded

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
    margin = lp.max(-1).values - chosen  # >= 0
    is_max = (lp.argmax(-1) == ids[:, 1:]) | (margin <= 0)
    tie = ~is_max & (margin <= noise)
    bad = mask & ~is_max & ~tie
    first = None
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        first = (b, t, float(margin[b, t]))
    return Agreement(int(mask.sum()), int((is_max & mask).sum()), int((tie & mask).sum()), noise,
                     torch.where(mask, margin, torch.full_like(margin, float("nan"))).cpu(), bad.any(1).cpu(), first)


@torch.no_grad()
def noise_floor(cap, images: torch.Tensor, captions: torch.Tensor, seed: int) -> float:
    """Largest change of the forward's log-probabilities at real positions when the same batch runs in
    halves (another batch size) and with one more padding column (another sequence length), in eval
    mode: the rounding a correct decoder's steps see. At least ``MIN_NOISE``."""
    def lp(x, c):
        with seeded(seed), in_mode(cap.model, False):
            return F.log_softmax(cap.logits(x, c).float(), -1)

    base = lp(images, captions)
    judged = judged_mask(cap, captions)[..., None]
    B = images.shape[0]
    moved = 0.0
    if B > 1:
        h = B // 2
        halves = torch.cat([lp(images[:h], captions[:h]), lp(images[h:], captions[h:])])
        moved = max(moved, float(torch.nan_to_num((base - halves).abs() * judged).max()))
    longer = torch.cat([captions, torch.full_like(captions[:, :1], cap.spec.pad_id)], 1)
    moved = max(moved, float(torch.nan_to_num((base - lp(images, longer)[:, : base.shape[1]]).abs() * judged).max()))
    return max(moved, MIN_NOISE)


def subject_noise_floor(s, cap, images, captions) -> float:
    """``noise_floor`` for one captioner and batch of a subject, measured once."""
    return s.measured(("noise_floor", id(cap.model), id(images)), lambda: noise_floor(cap, images, captions, s.seed))


def sequence_logprob(cap, images: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
    """``(B,)`` the forward's total log-probability of each caption in ``ids`` (BOS excluded, EOS included)."""
    lp = forward_logprobs(cap, images, ids, seed)
    mask = cap.target_mask(ids)
    return (lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum(1).cpu()


# ---- where generate() runs the decoder -------------------------------------------------------------
def generate_loop_site(cap, images: torch.Tensor, max_len: int):
    """``(module, file, line, code)`` of the line in the model's generate() loop that runs the decoder:
    the user's line, outside forward()'s own call path, from which most module calls of one generate()
    call are made (a loop calls its decoder step once per token). None when nothing can be traced."""
    import collections
    import inspect
    import linecache
    import sys

    model = cap.model
    try:
        gen_file = inspect.getsourcefile(inspect.unwrap(type(model).generate))  # past @torch.no_grad()
    except (TypeError, OSError, AttributeError):
        return None
    names = {m: n for n, m in model.named_modules()}

    def user_frames():
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_filename == gen_file:
                yield f
            f = f.f_back

    forward_path: set = set()
    calls: collections.Counter = collections.Counter()

    def on_forward(m, args):
        for f in user_frames():
            forward_path.add(f.f_code)

    def on_generate(m, args):
        for f in user_frames():
            if f.f_code not in forward_path and f.f_code.co_name != "forward":
                calls[(f.f_code.co_filename, f.f_lineno, names.get(m, ""))] += 1
                return

    def run(hook, fn):
        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if m is not model]
        try:
            with torch.no_grad(), in_mode(model, False), seeded(0):
                fn()
        finally:
            for h in handles:
                h.remove()

    x = images[:2]
    ids = torch.full((x.shape[0], 2), cap.spec.bos_id, dtype=torch.long, device=x.device)
    run(on_forward, lambda: cap.call(x, ids))
    run(on_generate, lambda: cap.generate(x, max_len=max_len))
    if not calls:
        return None
    by_line = collections.Counter()
    for (file, line, _), n in calls.items():
        by_line[(file, line)] += n
    (file, line), _ = by_line.most_common(1)[0]
    modules = collections.Counter({mod: n for (f, ln, mod), n in calls.items() if (f, ln) == (file, line)})
    module = min((m for m, n in modules.items() if n == max(modules.values())), key=lambda m: m.count("."))
    return module, file, line, linecache.getline(file, line).strip()
