"""Work counting against hand counts of multiply-adds on tiny fields."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snopt import ODEBlock
from snopt._layers import ConvField, MLPField
from snopt._work import WorkCounter, layer_macs


def test_layer_macs_by_hand():
    lin = nn.Linear(3, 2)
    assert layer_macs(lin, lin(torch.zeros(5, 3))) == 5 * 3 * 2
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    out = conv(torch.zeros(2, 4, 5, 5))
    # each of 2*6*5*5 outputs sums 4/2 channels times 3*3 taps
    assert layer_macs(conv, out) == 2 * 6 * 5 * 5 * 2 * 9
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv"):
        layer_macs(nn.ReLU(), out)


def test_mlp_block_work_is_hand_count_times_evaluations():
    torch.manual_seed(0)
    # ConcatLinear(2 -> 3) is Linear(3, 3); ConcatLinear(3 -> 2) is Linear(4, 2): 9 + 8 per sample.
    field = MLPField(2, hidden=3, depth=1)
    block = ODEBlock(field, t1=1.0, method="rk4", options={"step_size": 0.25})
    batch = 5
    x = torch.randn(batch, 2, requires_grad=True)
    with WorkCounter(block) as work:
        y = block(x)
        # 4 RK4 steps of 4 evaluations each (torchdiffeq's rk4 is the 3/8 rule)
        assert work.total == 16 * batch * 17
        assert block.totals.nfe_forward == 16
        y.sum().backward()
    nfe = block.totals.nfe_forward + block.totals.nfe_backward
    assert nfe > 16
    assert work.total == nfe * batch * 17
    # detached: no more counting
    block(x)
    assert work.total == nfe * batch * 17


def test_validation_mode_is_not_counted():
    block = ODEBlock(MLPField(2, hidden=3, depth=1), method="rk4", options={"step_size": 0.5})
    with WorkCounter(block) as work:
        block.eval()
        with torch.no_grad():
            block(torch.randn(4, 2))
        assert work.total == 0
        block.train()
        with torch.no_grad():
            block(torch.randn(4, 2))
        assert work.total == 8 * 4 * 17


def test_conv_field_per_block():
    model = nn.Sequential(
        ODEBlock(ConvField(2), method="euler", options={"step_size": 0.5}),
        ODEBlock(ConvField(2), method="euler", options={"step_size": 1.0}),
    )
    x = torch.randn(3, 2, 4, 4)
    with WorkCounter(model) as work:
        with torch.no_grad():
            model(x)
    # ConcatConv2d(2 -> 2) is Conv2d(3, 2, 3x3): 3*2*4*4 outputs x 3*9 per output, twice per evaluation
    per_eval = 2 * (3 * 2 * 4 * 4 * 3 * 9)
    assert work.per_block == {"0": 2 * per_eval, "1": 1 * per_eval}
