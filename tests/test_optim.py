"""capdiag's own Adam (capdiag.measure.optim) against torch.optim.Adam: same trajectory to float rounding."""
import copy

import pytest
import torch
from torch import nn

from capdiag.measure.optim import Adam


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 11))


def _train(model, opt, steps, skip_every=0):
    x = torch.arange(11).repeat(3)
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), x.roll(1))
        loss.backward()
        if skip_every and step % skip_every == 0:
            model[2].weight.grad = None  # a parameter that misses a step: its step count must lag
        opt.step()


@pytest.mark.parametrize("skip_every", [0, 3])
def test_matches_torch_adam(skip_every):
    ours, ref = _model(), _model()
    _train(ours, Adam(ours.parameters(), lr=3e-3), 25, skip_every)
    _train(ref, torch.optim.Adam(ref.parameters(), lr=3e-3), 25, skip_every)
    moved = 0.0
    for (name, a), b, init in zip(ours.named_parameters(), ref.parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((a - init).detach().abs().max()))
    assert moved > 1e-2  # the comparison means something: the weights did move


def test_bfloat16_and_float32_parameters_in_one_optimizer():
    model = _model()
    model[3].to(torch.bfloat16)
    w = copy.deepcopy(model[3].weight)
    opt = Adam(model.parameters(), lr=1e-2)
    h = model[2](model[1](model[0](torch.arange(11))))
    model[3](h.to(torch.bfloat16)).float().square().mean().backward()
    opt.step()
    assert model[3].weight.dtype == torch.bfloat16 and not torch.equal(model[3].weight, w)


def test_rejects_a_non_positive_learning_rate():
    with pytest.raises(ValueError, match="learning rate"):
        Adam(_model().parameters(), lr=0)
