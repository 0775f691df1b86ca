"""The adapter over a user's captioner: one calling convention for every check.

A user's model is called ``model(images, captions)`` and may return logits of length T or
T-1, a tuple, a dict or an object with ``.logits``. ``Captioner`` hides those differences:
``captioner.logits(images, captions)`` is always ``(B, T-1, V)`` with ``[:, t]`` scoring
``captions[:, t+1]``, and ``captioner.loss`` is the token-mean cross entropy over real
target tokens (BOS excluded, EOS included, padding excluded).
"""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelCallError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CaptionSpec:
    """What capdiag knows about the model's vocabulary and inputs (from hints or probing)."""

    vocab_size: int
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    image_size: int = 64
    max_len: int = 16
    image_module: Optional[str] = None
    pretrained: Any = None  # None: not declared; [] declares "nothing pretrained"
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    pixel_scale: float = 1.0  # the model's pixels span [0, pixel_scale] before mean/std (255: raw pixels)
    captions_keyword: Optional[str] = None  # call model(images, **{kw: captions}) when set
    attention_modules: Optional[list] = None  # dotted names; default: found by type and name
    assumptions: list = field(default_factory=list)
    normalization_declared: bool = False  # image_mean/image_std came from hints, not assumed

    @property
    def special_ids(self) -> set:
        return {self.pad_id, self.bos_id, self.eos_id}


def extract_logits(output: Any) -> torch.Tensor:
    """Pull the logits tensor out of whatever the model returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelCallError(
        f"model returned {type(output).__name__}; expected logits (B, T, V), a tuple whose first item is "
        "logits, or a dict/object with 'logits'"
    )


class Captioner:
    """Wraps a user's ``nn.Module`` with the captioning contract.

    Args:
        model: the user's captioner, called ``model(images, captions)``.
        spec: vocabulary, special ids and input facts.
        loss_fn: the user's own ``loss_fn(logits, captions)`` when the model file has one.
        name: shown in reports.
    """

    def __init__(self, model: nn.Module, spec: CaptionSpec, loss_fn: Optional[Callable] = None, name: str = "model",
                 bleu_fn: Optional[Callable] = None, stateless: bool = False):
        self.model = model
        # stateless: every call leaves the model's plain attributes as it found them, so state a
        # model carries between calls (a cached encoder output) can neither leak from one probe
        # into the next nor stay in the user's model. On for the subjects capdiag probes (and the
        # copies it trains); off by default, so that a training loop using this adapter keeps
        # whatever state its model means to carry. eval_determinism turns it off to detect state.
        self.stateless = stateless
        self.spec = spec
        self.loss_fn = loss_fn
        self.bleu_fn = bleu_fn
        self.name = name

    def with_model(self, model: nn.Module) -> "Captioner":
        """The same contract over another module (a deep copy that a check trains)."""
        return Captioner(model, self.spec, self.loss_fn, self.name, self.bleu_fn, self.stateless)

    # ---- devices and inputs -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def pixels(self, images: torch.Tensor):
        """Normalized images ``(B, 3, H, W)`` back to ``(B, H, W, 3)`` numpy arrays in [0, 1], for plots."""
        m = torch.tensor(self.spec.image_mean).view(1, 3, 1, 1)
        sd = torch.tensor(self.spec.image_std).view(1, 3, 1, 1)
        px = (images.detach().float().cpu() * sd + m) / self.spec.pixel_scale
        return px.clamp(0, 1).permute(0, 2, 3, 1).numpy()

    def to_inputs(self, images: torch.Tensor, captions: torch.Tensor):
        """Move a batch to the model's device (and float dtype) without touching the caller's tensors."""
        return images.to(self.device, self.dtype), captions.to(self.device)

    # ---- forward ------------------------------------------------------------------------
    def call(self, images: torch.Tensor, captions: torch.Tensor, protect: bool = True) -> Any:
        """Call the model. ``protect`` passes copies, so a model that edits its inputs in place
        cannot corrupt the batch other checks share (``input_mutation`` calls with protect=False)."""
        if protect:
            images, captions = images.clone(), captions.clone()
        with self._fresh():
            if self.spec.captions_keyword:
                return self.model(images, **{self.spec.captions_keyword: captions})
            return self.model(images, captions)

    def _fresh(self):
        from .state import preserved_attributes

        return preserved_attributes(self.model) if self.stateless else contextlib.nullcontext()

    def logits(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """Aligned logits ``(B, T-1, V)``: ``[:, t]`` scores ``captions[:, t+1]``."""
        out = extract_logits(self.call(images, captions))
        return align_logits(out, captions)

    # ---- caption structure --------------------------------------------------------------
    def lengths(self, captions: torch.Tensor) -> torch.Tensor:
        """Real length of each caption: BOS through the first EOS (inclusive).

        The first EOS after position 0 ends a caption even when pad == eos or bos == eos
        (GPT-2 and CLIP recipes), so padding is never inferred from an id alone.
        """
        B, T = captions.shape
        pos = torch.arange(T, device=captions.device).expand(B, T)
        is_eos = (captions == self.spec.eos_id) & (pos >= 1)
        has_eos = is_eos.any(1)
        first_eos = torch.where(is_eos, pos, torch.full_like(pos, T)).min(1).values
        lengths = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, T))
        if self.spec.pad_id != self.spec.eos_id:
            # No EOS: everything up to the last non-pad token is real.
            nonpad = (captions != self.spec.pad_id) | (pos == 0)
            last = torch.where(nonpad, pos, torch.zeros_like(pos)).max(1).values + 1
            lengths = torch.where(has_eos, lengths, last)
        return lengths

    def real_mask(self, captions: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` True at real caption positions (BOS..EOS)."""
        T = captions.shape[1]
        return torch.arange(T, device=captions.device)[None, :] < self.lengths(captions)[:, None]

    def target_mask(self, captions: torch.Tensor) -> torch.Tensor:
        """``(B, T-1)`` True where ``captions[:, t+1]`` is a real target token."""
        return self.real_mask(captions)[:, 1:]

    # ---- loss ---------------------------------------------------------------------------
    def token_losses(self, logits: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        targets = captions[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        return ce.view_as(targets)  # (B, T-1)

    def loss_from_logits(self, logits: torch.Tensor, captions: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        mask = self.target_mask(captions).to(torch.float32)
        ce = self.token_losses(logits, captions) * mask
        if per_sample:
            return ce.sum(1) / mask.sum(1).clamp_min(1)
        return ce.sum() / mask.sum().clamp_min(1)

    def loss(self, images: torch.Tensor, captions: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """capdiag's reference loss: mean CE over real target tokens (user losses are checked against it)."""
        return self.loss_from_logits(self.logits(images, captions), captions, per_sample=per_sample)

    # ---- decoding -----------------------------------------------------------------------
    @property
    def has_generate(self) -> bool:
        return callable(getattr(self.model, "generate", None))

    def generate(self, images: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
        """Token ids ``(B, L)`` starting with BOS: the model's ``generate`` or capdiag's greedy loop."""
        max_len = max_len or self.spec.max_len
        if self.has_generate:
            with self._fresh():
                out = self.model.generate(images.clone(), max_len=max_len)
            out = generated_ids(out, images.shape[0], self.spec.pad_id, images.device)
            if out.dim() != 2:
                raise ModelCallError(f"generate returned shape {tuple(out.shape)}; expected token ids (B, L)")
            if not bool((out[:, 0] == self.spec.bos_id).all()):
                out = torch.cat([torch.full_like(out[:, :1], self.spec.bos_id), out], 1)
            return out
        return self.greedy(images, max_len)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding through the teacher-forced forward (works for any contract model)."""
        max_len = max_len or self.spec.max_len
        B = images.shape[0]
        seq = torch.full((B, 1), self.spec.bos_id, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(max_len - 1):
            # Append a placeholder so models returning T-1 logits still score the next token.
            inp = torch.cat([seq, torch.full_like(seq[:, :1], self.spec.pad_id)], 1)
            nxt = self.logits(images, inp)[:, seq.shape[1] - 1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.spec.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == self.spec.eos_id
            if bool(done.all()):
                break
        return seq

    @torch.no_grad()
    def beam(self, images: torch.Tensor, beams: int = 3, max_len: Optional[int] = None) -> list:
        """Beam search through the teacher-forced forward: one caption per image (token lists
        starting with BOS, through EOS), the beam of the highest mean log-probability per token
        (length penalty 1, as Hugging Face's default). capdiag's own decoder, so greedy-vs-beam
        agreement means the same thing for every model."""
        max_len = max_len or self.spec.max_len
        B, k = images.shape[0], beams
        imgs = images.repeat_interleave(k, 0)
        seq = torch.full((B * k, 1), self.spec.bos_id, dtype=torch.long, device=images.device)
        score = torch.full((B, k), float("-inf"), device=images.device)
        score[:, 0] = 0.0  # all beams start equal: keep one so the first step does not pick duplicates
        done = torch.zeros(B * k, dtype=torch.bool, device=images.device)
        length = torch.ones(B * k, device=images.device)
        for _ in range(max_len - 1):
            inp = torch.cat([seq, torch.full_like(seq[:, :1], self.spec.pad_id)], 1)
            lp = F.log_softmax(self.logits(imgs, inp)[:, seq.shape[1] - 1].float(), -1)  # (B*k, V)
            V = lp.shape[-1]
            # A finished beam continues with padding at no cost, so it keeps its score.
            lp = torch.where(done[:, None], torch.full_like(lp, float("-inf")), lp)
            lp[done, self.spec.pad_id] = 0.0
            cand = (score.view(B * k, 1) + lp).view(B, k * V)
            score, idx = cand.topk(k, -1)
            src = (idx // V) + torch.arange(B, device=images.device)[:, None] * k
            tok = (idx % V).view(-1)
            src = src.view(-1)
            seq = torch.cat([seq[src], tok[:, None]], 1)
            was_done = done[src]
            length = length[src] + (~was_done).float()
            done = was_done | (tok == self.spec.eos_id)
            if bool(done.all()):
                break
        best = (score.view(-1) / length).view(B, k).argmax(-1) + torch.arange(B, device=images.device) * k
        return [r[: int(length[i])] for i, r in zip(best.tolist(), seq[best].tolist())]

    def strip(self, ids) -> list[list[int]]:
        """Token lists without BOS, EOS and padding (for BLEU and exact match).

        ``ids``: a (B, L) tensor or a list of id lists (of any lengths)."""
        out = []
        for row in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            row = row[1:] if row and row[0] == self.spec.bos_id else row
            words = []
            for t in row:
                if t == self.spec.eos_id:
                    break
                if t != self.spec.pad_id:
                    words.append(t)
            out.append(words)
        return out

    # ---- modules ------------------------------------------------------------------------
    def submodule(self, dotted: str) -> nn.Module:
        return resolve_module(self.model, dotted)

    def image_module(self) -> Optional[nn.Module]:
        return self.submodule(self.spec.image_module) if self.spec.image_module else None


def generated_ids(out: Any, batch: int, pad_id: int, device) -> torch.Tensor:
    """Long ids from what a ``generate()`` returned: a tensor, a tuple ``(ids, extras...)``, or one
    sequence per image (lists or 1-D tensors of different lengths, as beam searches often return),
    right-padded with ``pad_id``."""
    if isinstance(out, (tuple, list)) and len(out) == batch and all(
            isinstance(o, (list, tuple)) or (isinstance(o, torch.Tensor) and o.dim() == 1) for o in out):
        rows = [torch.as_tensor(o, dtype=torch.long).flatten() for o in out]
        L = max(1, max(len(r) for r in rows))
        return torch.stack([F.pad(r, (0, L - len(r)), value=pad_id) for r in rows]).to(device)
    if isinstance(out, (tuple, list)):
        out = out[0]  # (ids, attention weights, ...)
    return torch.as_tensor(out, device=device).long()


def align_logits(out: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    B, T = captions.shape
    if out.dim() != 3 or out.shape[0] != B:
        raise ModelCallError(
            f"model returned logits of shape {tuple(out.shape)} for captions {tuple(captions.shape)}; "
            f"expected (B, T, V) or (B, T-1, V) with B={B}"
        )
    if out.shape[1] == T:
        return out[:, :-1]
    if out.shape[1] == T - 1:
        return out
    raise ModelCallError(
        f"model returned {out.shape[1]} positions for captions of length T={T}; expected T or T-1 "
        "(slice off image-prefix positions in forward)"
    )


def resolve_module(model: nn.Module, dotted: str) -> nn.Module:
    """``model.get_submodule`` with a helpful error listing close names."""
    names = [n for n, _ in model.named_modules() if n]
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.5)
        alt = f"; did you mean {', '.join(close)}?" if close else f"; top-level modules: {', '.join(n for n in names if '.' not in n)}"
        raise UsageError(f"the model has no submodule {dotted!r}{alt}") from None
