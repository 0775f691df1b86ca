"""Every bad input capdiag must refuse with exit code 2 and one clear line.

Each row is a test (tests/test_cli.py) and a row of the README's table (tests/test_readme.py).
"""
from __future__ import annotations

GOOD = """
from capdiag.testing import zoo
CAPDIAG = dict(zoo.HINTS)
def build_model(bug=None, arch="transformer"):
    return zoo.make(arch, bug)
"""
FORWARD_RAISES = (
    "import torch\nclass M(torch.nn.Module):\n    def forward(self, images, captions):\n"
    "        raise RuntimeError('oops in forward')\ndef build_model():\n    return M()\n"
)
WRONG_SHAPE = (
    "import torch\nclass M(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.l = torch.nn.Linear(3, 30)\n    def forward(self, images, captions):\n"
    "        return self.l(images.mean((2, 3)))\ndef build_model():\n    return M()\n"
)
EVIL_WEIGHTS = (
    "import os, torch\nclass Evil:\n    def __reduce__(self):\n        return (os.system, ('touch pwned',))\n"
)

# (id, what the user did, model.py body or None, argv with {model}/{dir}, expected message excerpt)
CASES = [
    ("missing_file", "model file does not exist", None, ["check", "{dir}/nope.py"], "not found; pass the path to a .py file"),
    ("folder", "a folder instead of a file", None, ["check", "{dir}"], "is a folder without config.json; pass a .py file"),
    ("no_module", "unknown module name", None, ["check", "no_such_pkg.model"], "no model file or module 'no_such_pkg.model'"),
    ("syntax", "syntax error in the file", "def build_model(:\n    pass\n", ["check", "{model}"], "syntax error"),
    ("import", "import error inside the file", "import definitely_not_a_module_xyz\n", ["check", "{model}"],
     "No module named 'definitely_not_a_module_xyz'"),
    ("no_factory", "no build_model()", "def make():\n    pass\n", ["check", "{model}"], "defines no build_model(); add"),
    ("factory_raises", "build_model() raises", "def build_model():\n    raise ValueError('bad config')\n",
     ["check", "{model}"], "build_model() raised ValueError: bad config"),
    ("not_module", "build_model() returns no nn.Module", "def build_model():\n    return 3\n", ["check", "{model}"],
     "returned int; expected a torch.nn.Module"),
    ("forward_raises", "forward raises", FORWARD_RAISES, ["check", "{model}"],
     "forward raised RuntimeError: oops in forward (at"),
    ("wrong_shape", "logits of the wrong shape", WRONG_SHAPE, ["check", "{model}"], "expected (B, T, V) or (B, T-1, V)"),
    ("wrong_vocab", "logits disagree with vocab_size hint", GOOD + "CAPDIAG['vocab_size'] = 99\n", ["check", "{model}"],
     "logits over 24 tokens but CAPDIAG['vocab_size'] is 99"),
    ("bad_hint_module", "hint names a missing module", GOOD + "CAPDIAG['image_module'] = 'encodr'\n", ["check", "{model}"],
     "no submodule 'encodr'; did you mean encoder"),
    ("unknown_hint", "unknown hint key", GOOD + "CAPDIAG['vocab'] = 3\n", ["check", "{model}"], "unknown hint 'vocab' in CAPDIAG"),
    ("bad_captions", "sample_batch() captions not long", GOOD + "import torch\ndef sample_batch():\n"
     "    return torch.zeros(2, 3, 32, 32), torch.zeros(2, 7)\n", ["check", "{model}"],
     "captions are torch.float32 (2, 7); expected a long tensor (B, T)"),
    ("bad_images", "sample_batch() images not float", GOOD + "import torch\ndef sample_batch():\n"
     "    return torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.ones(2, 7, dtype=torch.long)\n", ["check", "{model}"],
     "images are torch.uint8 (2, 3, 32, 32); expected a float tensor (B, 3, H, W)"),
    ("unknown_check", "unknown check in --only", GOOD, ["check", "{model}", "--only", "causal_leek"],
     "unknown check 'causal_leek'; did you mean causal_leak"),
    ("bad_arg", "malformed --arg", GOOD, ["check", "{model}", "--arg", "nonsense"], "must look like NAME=VALUE"),
    ("bad_steps", "overfit --steps 0", GOOD, ["overfit", "{model}", "--steps", "0"], "--steps must be at least 1"),
    ("missing_weights", "reference weights path missing", GOOD + "CAPDIAG['pretrained'] = {'encoder': 'missing.pth'}\n",
     ["check", "{model}"], "reference weights 'missing.pth' not found"),
    ("pickle_weights", "reference weights are a pickle of something else", GOOD
     + "CAPDIAG['pretrained'] = {'encoder': __file__.replace('model.py', 'evil.pt')}\n", ["check", "{model}"],
     "is not a plain state_dict"),
    ("missing_checkpoint", "--weights path missing", GOOD, ["check", "{model}", "--weights", "{dir}/nope.pt"],
     "checkpoint '"),
    ("pickle_checkpoint", "--weights file is a pickle of something else", GOOD, ["check", "{model}", "--weights", "{dir}/evil.pt"],
     "is not a plain state_dict or checkpoint torch.load(weights_only=True) can read"),
    ("missing_data", "--data path missing", GOOD, ["check", "{model}", "--data", "{dir}/nope"], "does not exist; give a COCO"),
    ("data_no_tokenizer", "--data without a tokenizer", GOOD, ["check", "{model}", "--data", "{dir}/coco"],
     "--data needs a tokenizer"),
    ("tokenizer_no_data", "--tokenizer without --data", GOOD, ["check", "{model}", "--tokenizer", "{dir}/wm.json"],
     "--tokenizer is used with --data"),
    ("hf_unknown", "a Hugging Face folder of another model type", None, ["check", "{dir}/bert"],
     "config.json has model_type 'bert'"),
]
