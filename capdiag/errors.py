"""capdiag's own exceptions.

The library raises these; only the CLI turns them into exit codes (2 for every
``CapdiagError``). Each message is one line that says what is wrong and what to do.
"""


class CapdiagError(Exception):
    """Base class: a problem with the user's input, not a finding about the model."""


class ModelFileError(CapdiagError):
    """The model file is missing, cannot be imported, or lacks the contract's pieces."""


class ModelCallError(CapdiagError):
    """Building or calling the model failed, or it returned something unusable."""


class UsageError(CapdiagError):
    """Bad command-line or API arguments (unknown check, unavailable device, ...)."""


class WeightsError(CapdiagError):
    """A reference-weights path is missing or is not a plain state_dict."""


class ClobberedWeightsError(CapdiagError):
    """Raised by ``guard_pretrained`` when code overwrote pretrained weights."""


class CheckpointMismatch(Exception):
    """A checkpoint's keys or shapes do not fit the built model: a finding about the model and its
    checkpoint (exit 1), not bad input; the message names the key groups on each side."""


class DataError(CapdiagError):
    """``--data``/``--tokenizer`` point at something capdiag cannot read as captions and images."""


class NonFiniteOutput(Exception):
    """Logits were NaN/inf: the runner turns this into a failing finding that says where."""

    def __init__(self, where: str, train: bool):
        self.where, self.train = where, train
        super().__init__(f"non-finite logits in {'train' if train else 'eval'} mode; first non-finite output: {where}")
