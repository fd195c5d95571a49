"""Shared by the model tests: a few optimizer steps on one fixed batch, checking gradients on the way."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def few_steps():
    def run(model, batch, receives_grad=(), steps: int = 6, lr: float = 3e-3):
        """Train ``steps`` Adam steps on ``batch``; every gradient finite, every tensor in ``receives_grad``
        (a function of the model returning parameters) gets one. Returns (losses, last output)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(steps):
            out = model(*batch)
            opt.zero_grad()
            out.loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
            for p in receives_grad(model) if receives_grad else ():
                assert p.grad.abs().sum() > 0
            opt.step()
            losses.append(out.loss.item())
        return losses, out
    return run
