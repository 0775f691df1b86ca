"""Small measuring helpers shared by checks: seeded forwards, tolerances, non-finite tracing."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..captioner import Captioner
from ..errors import NonFiniteOutput
from ..hooks import hooked, tensors_in
from ..state import in_mode, seeded


def tolerance(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> float:
    """Relative tolerance for "unchanged".

    On CPU float32, a changed sequence length reorders reductions by ~1e-6. On CUDA, another
    length picks other kernels (attention backends, TF32 convs): a clean full-size
    CNN+Transformer moved by 7.7e-4 on an H100 when pad columns were appended. Real bugs move
    logits by 1e-2 and more. Half precision: ~1e-3 per op.
    """
    if (dtype or t.dtype) in HALF:  # the precision the model computes in (see compute_dtype), not the logits'
        return 2e-2
    return 5e-3 if t.device.type == "cuda" else 1e-4


def tolerance_same_shape(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> float:
    """Tolerance for "changed" between two passes of identical shapes: the same kernels run, so
    anything above rounding noise is a real dependence (used where a loose tolerance would hide
    one, e.g. logits dominated by huge untrained features)."""
    return 1e-3 if (dtype or t.dtype) in HALF else 1e-6


HALF = (torch.float16, torch.bfloat16)


@torch.no_grad()
def compute_dtype(cap: Captioner, images: torch.Tensor, captions: torch.Tensor) -> torch.dtype:
    """The precision the forward actually computes in: the half dtype when any module returns half
    tensors (``torch.autocast`` inside forward, bf16/fp16 parameters), else the parameters' dtype.
    Tolerances follow this, not the parameter dtype: a float32 model that runs its decoder under
    bf16 autocast changes its logits by ~5e-3 with the batch size alone."""
    seen: set = set()

    def hook(m, i, o):
        for t in tensors_in(o):
            if t.is_floating_point():
                seen.add(t.dtype)

    with hooked(cap.model.modules(), hook), in_mode(cap.model, False), seeded(0):
        cap.logits(images[:2], captions[:2])
    half = [d for d in HALF if d in seen]
    return half[0] if half else cap.dtype


def precision(s) -> torch.dtype:
    """``compute_dtype`` of a subject's model on its batch, measured once per subject."""
    return s.measured("compute_dtype", lambda: compute_dtype(s.captioner, s.images, s.captions))


@torch.no_grad()
def activation_scale(cap: Captioner, images, captions, train: bool, seed: int) -> float:
    """Largest |value| any module outputs in one forward (train or eval mode, buffers restored)."""
    top = [0.0]

    def hook(m, i, o):
        for t in tensors_in(o):
            if t.is_floating_point() and t.numel():
                top[0] = max(top[0], float(t.detach().abs().max()))

    with hooked(cap.model.modules(), hook), in_mode(cap.model, train), seeded(seed):
        cap.logits(images, captions)
    return top[0]


def untrained_batchnorm(model) -> bool:
    """Whether some BatchNorm still has its initial running statistics (mean 0, var 1): in eval
    mode such a network is not normalized at all, and deep random CNNs blow up or vanish."""
    from .batchnorm import has_default_stats, tracking_batchnorms

    return any(has_default_stats(m) for _, m in tracking_batchnorms(model))


def rel_diff(a: torch.Tensor, b: torch.Tensor, dim: Optional[tuple] = None) -> torch.Tensor:
    """max|a-b| / max|a| (over ``dim`` or everything); NaN-safe enough for verdicts."""
    a, b = a.float(), b.float()
    if dim is None:
        return (a - b).abs().max() / a.abs().max().clamp_min(1e-6)
    return (a - b).abs().amax(dim=dim) / a.abs().amax(dim=dim).clamp_min(1e-6)


@torch.no_grad()
def logits_in(cap: Captioner, images, captions, train: bool, seed: int, check_finite: bool = True) -> torch.Tensor:
    """Aligned logits with the model in train or eval mode and dropout seeded identically each call.

    Raises:
        NonFiniteOutput: the logits contain NaN/inf (a comparison of them would mean nothing).
    """
    with in_mode(cap.model, train), seeded(seed):
        out = cap.logits(images, captions).float()
    if check_finite and not bool(torch.isfinite(out).all()):
        raise NonFiniteOutput(first_nonfinite_module(cap, images, captions, train, seed), train)
    return out


def judged_mask(cap: Captioner, *captions: torch.Tensor) -> torch.Tensor:
    """``(B, T-1)`` True where the target is a real token (BOS..EOS) in every one of ``captions``.

    Logits at positions whose target is padding mean nothing: tutorial decoders compute lengths
    from padding and leave exact zeros there. When a perturbation moves where a caption ends,
    only positions real in both the baseline and the perturbed captions may be compared.
    """
    mask = cap.target_mask(captions[0])
    for c in captions[1:]:
        mask = mask & cap.target_mask(c)
    return mask


def inner_positions(cap: Captioner, captions: torch.Tensor, after: int = 0) -> torch.Tensor:
    """``(B, T)`` True at word positions strictly between BOS and each caption's EOS, after ``after``.

    Replacing only these keeps every caption's length, EOS and padding: a perturbation that
    moved the end would change what a length-sorting decoder computes for reasons that are not
    the property under test."""
    B, T = captions.shape
    pos = torch.arange(T, device=captions.device)[None, :]
    ends = cap.lengths(captions)[:, None] - 1  # index of EOS (or the last real token)
    has_eos = (captions.gather(1, ends.clamp(max=T - 1)) == cap.spec.eos_id)
    last_word = torch.where(has_eos, ends - 1, ends)
    return (pos > max(after, 0)) & (pos <= last_word)


def replace_tokens(cap: Captioner, captions: torch.Tensor, where: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A copy of ``captions`` with random non-special ids, each different from the old one, ``where`` True."""
    out = captions.clone()
    n = int(where.sum())
    if n:
        out[where] = random_tokens(cap, (n,), g, avoid=captions[where]).to(captions.device)
    return out


def train_mode_reproducible(cap: Captioner, images, captions, seed: int) -> bool:
    """Whether two identical, identically seeded train-mode calls give bitwise-identical logits:
    only then may a train-mode difference between two inputs be read as a dependence (a model that
    reorders the batch or draws a different number of random numbers per input gets other dropout
    masks per sample)."""
    a = logits_in(cap, images, captions, True, seed)
    b = logits_in(cap, images, captions, True, seed)
    return bool(torch.equal(a, b))


def eval_is_random(cap: Captioner, images, captions, seed: int, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether eval-mode logits change with the RNG seed (dropout or sampling left on at inference).
    Then any comparison of two different inputs mixes in other random draws: structural probes
    skip and leave the finding to eval_determinism."""
    a = logits_in(cap, images, captions, False, seed)
    b = logits_in(cap, images, captions, False, seed + 1)
    return float(rel_diff(a, b)) > tolerance_same_shape(a, dtype or cap.dtype)


def subject_eval_is_random(s) -> bool:
    """``eval_is_random`` on a subject's batch, measured once per subject."""
    return s.measured("eval_is_random", lambda: eval_is_random(s.captioner, s.images, s.captions, s.seed, precision(s)))


def subject_train_reproducible(s) -> bool:
    """``train_mode_reproducible`` on a subject's batch, measured once per subject."""
    return s.measured("train_mode_reproducible",
                      lambda: train_mode_reproducible(s.captioner, s.images, s.captions, s.seed))


RANDOM_EVAL = "eval-mode logits change with the random seed (dropout or sampling active at inference; " \
              "eval_determinism reports it): comparisons of different inputs would measure the noise"


def random_tokens(cap: Captioner, shape, generator: torch.Generator, avoid: Optional[torch.Tensor] = None):
    """Random non-special token ids; where ``avoid`` is given, every id differs from it."""
    V = cap.spec.vocab_size
    specials = sorted(cap.spec.special_ids)
    ids = torch.randint(0, V, shape, generator=generator)
    for _ in range(8):
        bad = torch.zeros(shape, dtype=torch.bool)
        for s in specials:
            bad |= ids == s
        if avoid is not None:
            bad |= ids == avoid.cpu()
        if not bad.any():
            break
        ids[bad] = torch.randint(0, V, (int(bad.sum()),), generator=generator)
    return ids


@contextlib.contextmanager
def traced_nonfinite(model: nn.Module) -> Iterator[list]:
    """Record, in execution order, modules whose forward output has NaN/inf; hooks removed in finally."""
    found: list = []

    def hook(name):
        def fn(module, inputs, output):
            if found:
                return
            for t in tensors_in(output):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    found.append(name)
                    return
        return fn

    with hooked([(m, hook(name)) for name, m in model.named_modules()]):
        yield found


@contextlib.contextmanager
def traced_no_grad(model: nn.Module) -> Iterator[set]:
    """Record names of modules whose forward ran with autograd disabled (under ``torch.no_grad()``
    or ``inference_mode``) while the block itself runs with grad enabled; hooks removed in finally."""
    found: set = set()

    def hook(name):
        def fn(module, inputs, output):
            if not torch.is_grad_enabled():
                found.add(name)
        return fn

    with hooked([(m, hook(name)) for name, m in model.named_modules() if name]):
        yield found


def first_nonfinite_module(cap: Captioner, images, captions, train: bool, seed: int) -> str:
    """Name of the first module whose output is non-finite (or 'the loss' if only the loss is)."""
    with torch.no_grad(), in_mode(cap.model, train), seeded(seed), traced_nonfinite(cap.model) as found:
        cap.logits(images, captions)
    if found:
        return found[0] or f"the top-level forward of {type(cap.model).__name__}"
    return "the loss (logits are finite)"


_PARTS = (
    ("embedding", ("embed", "wte", "wpe", "tok_emb", "pos_emb", "word_emb", "pos")),
    ("encoder", ("encoder", "cnn", "backbone", "visual", "vision", "resnet", "efficientnet", "image")),
    ("projection", ("proj", "bridge", "adapter", "mapper", "init_h", "init_c", "prefix", "merge")),
    ("output", ("lm_head", "fc_out", "classifier", "output", "head", "out", "fc")),
    ("decoder", ("decoder", "rnn", "lstm", "gru", "cell", "transformer", "att", "gpt", "layers", "blocks")),
)


def param_part(name: str) -> str:
    """Coarse part of a captioner a parameter belongs to (encoder / projection / embedding /
    decoder / output), judged from its top-level module name first: ``decoder.x.out_proj``
    is decoder, not projection."""
    top = name.split(".")[0].lower()
    for part, keys in _PARTS:
        if any(top == k or top.startswith(k) for k in keys):
            return part
    n = name.lower()
    for part, keys in _PARTS:
        if any(k in n for k in keys):
            return part
    return "decoder"


def _copied(x):
    """A deep copy of a module output's tensors (None when the output is not tensors in containers)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        items = [_copied(y) for y in x]
        return None if any(i is None and y is not None for i, y in zip(items, x)) else type(x)(items)
    if isinstance(x, dict):
        items = {k: _copied(v) if isinstance(v, (torch.Tensor, tuple, list, dict)) else v for k, v in x.items()}
        return type(x)(**items) if hasattr(x, "to_tuple") else type(x)(items)
    return x if x is None or isinstance(x, (int, float, str, bool)) else None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@contextlib.contextmanager
def reused_image_features(cap: Captioner) -> Iterator[None]:
    """Inside the block, an eval-mode, no-grad call of the image module with inputs equal to an earlier
    call's gets a copy of that call's output instead of running the encoder again.

    For probes that change only the captions (causal_leak, caption_dependence, padding_invariance):
    on a real-sized CNN the encoder is most of every forward, and its output cannot depend on the
    captions. Calls with autograd on always run the module; in train mode an output is reused only
    when computing it drew no random numbers (dropout in the encoder would otherwise shift the masks
    of everything after it), and eval and train outputs are kept apart. An output that is not
    tensors in containers is never reused. The module's own ``forward`` is restored in ``finally``;
    its hooks run as usual on every call.
    """
    module = cap.image_module()
    if module is None:
        yield
        return
    own = module.__dict__.get("forward")  # an instance attribute of the user's, kept as it was
    original = module.forward
    seen: list = []

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return original(*args, **kwargs)
        for a, k, mode, out in seen:
            if mode == module.training and _same(a, args) and _same(k, kwargs):
                return _copied(out)
        rng = torch.get_rng_state()
        out = original(*args, **kwargs)
        kept = _copied(out)
        # Train mode only when the module drew no random numbers: skipping it must not shift the
        # dropout masks of the modules after it.
        if kept is not None and (not module.training or torch.equal(rng, torch.get_rng_state())):
            seen.append(([_copied(x) for x in args], {n: _copied(v) for n, v in kwargs.items()}, module.training, kept))
        return out

    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            del module.forward
