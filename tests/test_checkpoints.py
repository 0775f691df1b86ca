"""--weights: the checkpoint kinds people save load strictly into the built model; a checkpoint that
does not fit is a failure (exit 1) naming the key groups, a file that is no checkpoint bad input (exit 2)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from capdiag.intake.checkpoints import load_checkpoint
from capdiag.errors import CheckpointMismatch
from capdiag.testing import zoo

MODEL = ("from capdiag.testing import zoo\nCAPDIAG = dict(zoo.HINTS)\n"
         "def build_model(arch='transformer'):\n    return zoo.make(arch)\n")


def trained():
    torch.manual_seed(7)
    m = zoo.make("transformer")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differs from any fresh build
    return m


def save_plain(m, d):
    torch.save(m.state_dict(), d / "w.pt")
    return d / "w.pt"


def save_tutorial_dict(m, d):
    torch.save({"epoch": 3, "model_state_dict": m.state_dict(), "loss": 0.5}, d / "w.pth")
    return d / "w.pth"


def save_safetensors(m, d):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "w.safetensors"))
    return d / "w.safetensors"


def save_data_parallel(m, d):
    torch.save(nn.DataParallel(m).state_dict(), d / "w.pt")  # keys "module.<name>", as DDP saves them
    return d / "w.pt"


def save_lightning(m, d):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            images, captions = batch
            logits = self.model(images, captions)[:, :-1]
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), captions[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # a real step that changes nothing

    images, captions = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6, 2, 0, 0, 0]] * 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, captions), batch_size=2)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(d))
    trainer.fit(Module(m), loader)
    trainer.save_checkpoint(str(d / "last.ckpt"))
    return d / "last.ckpt"


KINDS = {"plain": save_plain, "tutorial_dict": save_tutorial_dict, "safetensors": save_safetensors,
         "ddp_prefix": save_data_parallel, "lightning_ckpt": save_lightning}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_checkpoint_kind_loads_exactly(kind, tmp_path):
    source = trained()
    path = KINDS[kind](source, tmp_path)
    fresh = zoo.make("transformer")
    said = load_checkpoint(fresh, str(path))
    for (name, a), b in zip(fresh.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    assert str(path) in said and ("prefix" in said) == (kind in ("ddp_prefix", "lightning_ckpt"))


def test_cli_check_runs_on_the_loaded_weights(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    path = save_data_parallel(trained(), tmp_path)
    r = subprocess.run([sys.executable, "-m", "capdiag", "check", str(tmp_path / "model.py"), "--only", "causal_leak",
                        "--weights", str(path), "--json", str(tmp_path / "f.json")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"weights {path} (38 tensors, prefix 'module.' removed)" in r.stdout
    assert '"weights": "' in (tmp_path / "f.json").read_text()


def test_a_checkpoint_of_another_model_fails_with_the_key_groups(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    torch.save(zoo.make("lstm").state_dict(), tmp_path / "lstm.pt")
    r = subprocess.run([sys.executable, "-m", "capdiag", "check", str(tmp_path / "model.py"), "--quick",
                        "--weights", str(tmp_path / "lstm.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("FAIL  checkpoint")
    assert "decoder.layers.*" in lines[0] and "attention.att_img.*" in lines[0] and "strict=False" in lines[0]


def test_one_missing_tensor_or_shape_is_a_mismatch_not_a_partial_load():
    m = zoo.make("transformer")
    state = m.state_dict()
    del state["out.bias"]
    with pytest.raises(CheckpointMismatch, match=r"1 of the model's 38 tensors missing \(out\.bias"):
        load_checkpoint(zoo.make("transformer"), _saved(state))
    state = m.state_dict()
    state["out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatch, match=r"other shapes \(out\.weight \(3, 3\)"):
        load_checkpoint(zoo.make("transformer"), _saved(state))


def _saved(state, _n=[0]):
    import tempfile

    _n[0] += 1
    path = f"{tempfile.mkdtemp()}/s{_n[0]}.pt"
    torch.save(state, path)
    return path
