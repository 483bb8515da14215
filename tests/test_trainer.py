"""Tests of trainer.py, the loop both trainers share (CPU): python -m pytest -q tests/test_trainer.py

The trainers' own tests (tests/test_train_tokenizer.py, tests/test_train_ar.py) run it end to end: exact resume,
torchrun against one process, the non-finite guard, the graphed step.
"""
from types import SimpleNamespace

import numpy as np
import torch

from trainer import Order, Trainer, get_lr

CPU = torch.device("cpu")


def test_lr_warms_up_holds_and_decays():
    lrs = [get_lr(step, 1.0, 2, 6, 10) for step in range(10)]
    assert lrs == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [get_lr(step, 1.0, 2, 10, 10) for step in range(10)] == [0.0, 0.5] + [1.0] * 8  # paper: constant
    assert [get_lr(step, 1.0, 0, 2, 4, min_lr=0.5) for step in range(1, 5)] == [1.0, 1.0, 0.75, 0.5]  # to min_lr


def test_order_takes_each_item_once_per_epoch_and_depends_on_the_step_alone():
    order = Order(torch.arange(10), 4, 0, CPU)  # steps straddle the epochs: 10 items, 4 a step
    seen = torch.cat([order(s) for s in range(5)])  # two epochs
    assert sorted(seen[:10].tolist()) == sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])
    assert torch.equal(Order(torch.arange(10), 4, 0, CPU)(3), order(3))  # a fresh order (a resumed run) agrees
    assert not torch.equal(Order(torch.arange(10), 4, 1, CPU)(0), order(0))  # another seed


def test_order_takes_each_image_once_in_one_view():
    n = 1000
    rows = Order(np.arange(n), n, 0, CPU, views=2, n=n).epoch(3)
    assert sorted((rows % n).tolist()) == list(range(n)) and set((rows // n).tolist()) == {0, 1}
    assert torch.equal(rows, Order(np.arange(n), n, 0, CPU, views=2, n=n).epoch(3))
    assert not torch.equal(rows, Order(np.arange(n), n, 0, CPU, views=2, n=n).epoch(4))
    assert (Order(np.arange(n), n, 0, CPU).epoch(3) < n).all()


def test_ema_follows_lerp_and_a_non_finite_step_is_skipped_whole(tmp_path, capsys):
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)  # its loss: the mean output
    args = SimpleNamespace(weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, ema_decay=0.9, resume=False,
                           cuda_graph=False, peak_tflops=1.0)
    ema = [p.detach().clone() for p in layer.parameters()]
    run = Trainer(layer, layer, lambda m, x: layer(x).mean()[None], ["loss"], ema, args, CPU, "test", None, tmp_path)
    before, x = [e.clone() for e in ema], torch.randn(2, 4)
    loss = layer(x).mean().item()
    run([(x,)], 0.1)
    expected = [e.lerp(p.detach(), 0.1) for e, p in zip(before, layer.parameters())]
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(ema, expected))
    kept, weights = [e.clone() for e in ema], [p.detach().clone() for p in layer.parameters()]
    run([(x * float("nan"),)], 0.1)  # skipped: the weights, AdamW and the EMA stay as they were
    assert all(torch.equal(a, b) for a, b in zip(kept, ema))
    assert all(torch.equal(a, b) for a, b in zip(weights, layer.parameters()))
    assert run.step == 2 and run.opt.state[layer.weight]["step"].item() == 1
    run.log(2, 1, "img")
    assert run.last["loss"] == loss and "step 2/2 | loss " in capsys.readouterr().out  # the mean of the applied step
