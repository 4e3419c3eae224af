"""The one optimizer step: accumulation, clipping, non-finite skips agreed across ranks, lr groups."""

from __future__ import annotations

import pytest
import torch

from rlplat.algos.optim import OptimizerStep, annealed_lr, build_optimizer, set_lr


def model_and_optimizer(weight_decay: float = 0.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, build_optimizer([{"params": list(model.parameters()), "lr": 0.1}],
                                  {"lr": 0.1, "eps": 1e-8, "weight_decay": weight_decay})


def test_step_matches_a_hand_written_adam_step():
    model, optimizer = model_and_optimizer()
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1, eps=1e-8)
    x = torch.randn(5, 3)
    norm = OptimizerStep(optimizer, max_grad_norm=0.5).step(model(x).pow(2).sum())
    ref_loss = ref(x).pow(2).sum()
    ref_loss.backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    ref_opt.step()
    assert norm == pytest.approx(float(expected_norm))
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_accumulated_parts_equal_one_step_on_their_sum():
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    a, opt_a = model_and_optimizer()
    step = OptimizerStep(opt_a, max_grad_norm=10.0)
    step.begin()
    assert step.backward(a(x1).sum() / 2) and step.backward(a(x2).sum() / 2)
    step.finish()
    b, opt_b = model_and_optimizer()
    OptimizerStep(opt_b, max_grad_norm=10.0).step((b(x1).sum() + b(x2).sum()) / 2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_non_finite_loss_is_skipped_and_counted():
    model, optimizer = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    step = OptimizerStep(optimizer, max_grad_norm=0.5)
    step.begin()
    assert step.backward(model(torch.ones(1, 3)).sum())  # a finite part first: its gradient is discarded
    assert not step.backward(torch.tensor(float("nan")))
    assert step.finish() is None and step.skipped == 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_another_ranks_non_finite_loss_skips_here_too():
    model, optimizer = model_and_optimizer()
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def sync_mean(values):  # this rank reports 0 (finite); the other rank reported 1
        seen.append(values)
        return [(values[0] + 1.0) / 2]

    synced = []
    step = OptimizerStep(optimizer, 0.5, sync_grads=lambda: synced.append(1), sync_mean=sync_mean)
    assert step.step(model(torch.ones(1, 3)).sum()) is None
    assert seen == [[0.0]] and synced == []  # no gradient all-reduce that the other rank would not join
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_non_finite_gradient_norm_is_skipped():
    model, optimizer = model_and_optimizer()
    model.weight.register_hook(lambda g: g * float("inf"))
    before = model.weight.detach().clone()
    step = OptimizerStep(optimizer, 0.5)
    assert step.step(model(torch.ones(1, 3)).sum()) is None and step.skipped == 1
    assert torch.equal(model.weight, before)


def test_groups_keep_their_lr_ratio_under_set_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-3}], {"lr": 1e-4})
    set_lr(optimizer, annealed_lr({"lr": 1e-4, "anneal_lr": True}, step=5, total_steps=10))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-5, 5e-4])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.0


def test_annealing_follows_the_iterations_or_the_time_budget_whichever_is_further():
    optim = {"lr": 1e-3, "anneal_lr": True}
    assert annealed_lr(optim, step=2, total_steps=10) == pytest.approx(8e-4)
    assert annealed_lr(optim, step=2, total_steps=10, time_share=0.5) == pytest.approx(5e-4)  # time is further
    assert annealed_lr(optim, step=8, total_steps=10, time_share=0.5) == pytest.approx(2e-4)  # steps are further
    assert annealed_lr(optim, step=2, total_steps=10, time_share=1.3) == 0.0  # past the budget: 0, never negative
    assert annealed_lr({"lr": 1e-3}, step=8, total_steps=10, time_share=0.9) == 1e-3  # no anneal_lr: constant
