"""Stochastic gradient descent written by hand, with the semantics of ``torch.optim.SGD``."""

from __future__ import annotations

from typing import Iterable

import torch


class SGD:
    """SGD with momentum, dampening, Nesterov momentum, weight decay and maximize.

    For each parameter ``theta`` with gradient ``g`` at step ``t`` (``t = 1`` is the first call of
    ``step``), with learning rate ``lr``, weight decay ``lambda``, momentum ``mu`` and dampening
    ``tau``, the update is, in the order the code runs it:

        g   <- -g                                 if maximize
        g   <- g + lambda * theta                 if lambda != 0   (weight decay, L2 penalty)
        b_t <- g                                  if mu != 0 and t = 1
        b_t <- mu * b_{t-1} + (1 - tau) * g       if mu != 0 and t > 1
        g   <- g + mu * b_t                       if mu != 0 and nesterov
        g   <- b_t                                if mu != 0 and not nesterov
        theta <- theta - lr * g

    This matches ``torch.optim.SGD`` (PyTorch 2.x), whose momentum differs from the form
    ``v <- mu * v + lr * g; theta <- theta - v`` of Sutskever et al. (2013) by where ``lr`` enters:
    the two agree while ``lr`` is constant. Each line uses the same tensor operation as PyTorch's
    single-tensor implementation, so the results are equal to the last bit on the CPU.

    Unlike PyTorch, ``step`` runs the first two lines in the storage of ``.grad``, so afterwards
    ``.grad`` contains ``g`` negated for ``maximize`` and with ``lambda * theta`` added, the value
    before the momentum lines. Writing in place saves a new tensor per parameter, and memory
    traffic is what limits the speed of this update. Compute fresh gradients before the next
    ``step``.

    Args:
        params: the parameters to update; their ``.grad`` holds ``g``.
        lr: learning rate, ``>= 0``.
        momentum: ``mu >= 0``; 0 turns momentum off.
        dampening: ``tau``; scales down the new gradient in the momentum buffer.
        weight_decay: ``lambda >= 0``.
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        maximize: ascend the objective instead of descending it.

    Raises:
        ValueError: for a negative ``lr``, ``momentum`` or ``weight_decay``, or for Nesterov
            without momentum or with dampening. The message shows the value.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 maximize: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; it must be >= 0.")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}; it must be >= 0.")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; it must be >= 0.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening, got "
                             f"momentum={momentum}, dampening={dampening}.")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("SGD got an empty parameter list.")
        self.lr = lr
        self.momentum = momentum
        self.dampening = dampening
        self.weight_decay = weight_decay
        self.nesterov = nesterov
        self.maximize = maximize
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        """Drop every gradient, as ``torch.optim.Optimizer.zero_grad(set_to_none=True)`` does."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.maximize:
                g.neg_()
            if self.weight_decay != 0:
                g.add_(p, alpha=self.weight_decay)

            if self.momentum != 0:
                buffer = self.momentum_buffers[i]
                if buffer is None:
                    buffer = torch.clone(g).detach()
                    self.momentum_buffers[i] = buffer
                else:
                    buffer.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
                g = g.add(buffer, alpha=self.momentum) if self.nesterov else buffer

            p.add_(g, alpha=-self.lr)
