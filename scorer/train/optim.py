"""The optimisation step both fine-tuning loops share: clip, step, schedule."""

from __future__ import annotations

import torch


def warmup_then_linear_decay(opt: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """Linear warm-up to the peak learning rate, then linear decay to 5% of it."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) * max(0.05, 1 - s / max_steps)
    )


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()
