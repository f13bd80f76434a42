"""Backpropagation written by hand, over a whole batch at once.

With ``delta[l] = dL/dz[l]`` of shape ``(B, n[l])`` and ``*`` the element-wise product:

    delta[L]  = dL/da[L] * f[L]'(z[L])
    dL/dW[l]  = delta[l].T @ a[l-1]                    (n[l], n[l-1]), like W[l]
    dL/db[l]  = delta[l].sum(axis=0)                   (n[l],),        like b[l]
    delta[l-1] = (delta[l] @ W[l]) * f[l-1]'(z[l-1])   (B, n[l-1])

The batch is summed by the matrix product, so there is no loop over samples. The loss's own
reduction (a sum, or a mean over the batch) is already inside ``dL/da[L]``.
"""

from __future__ import annotations

import logging

import torch

from cifar2.network import MLP

logger = logging.getLogger(__name__)


@torch.no_grad()
def backward(model: MLP, dL_dout: torch.Tensor, store_grad: bool = True, debug: bool = False) -> None:
    """Fill ``model.dL_dw[l]`` and ``model.dL_db[l]`` from the last forward pass.

    Args:
        model: a network whose ``forward`` has just run on the batch.
        dL_dout: the loss's gradient with respect to the output ``a[L]``, shape ``(B, n[L])``,
            for example ``CrossEntropy().gradient(y_hat, y)``.
        store_grad: also hand the gradients to each parameter's ``.grad``, so an optimizer
            (manual or ``torch.optim``) can take a step with them. As with autograd, nothing is
            copied: ``.grad`` and ``model.dL_dw[l]`` share one tensor, which the next backward
            pass overwrites, and so does ``cifar2.optimizer.SGD.step``, which adds weight decay
            to ``.grad`` in place. Without ``store_grad``, ``.grad`` is left as it was.
        debug: log each layer's tensor shapes, for readers following the formulas.

    Runs under ``torch.no_grad()``, so it records no autograd graph.
    """
    L = model.L
    if L not in model.a:
        raise ValueError("backward needs the values of a forward pass; run model(x) on this batch first.")
    if dL_dout.shape != model.a[L].shape:
        raise ValueError(f"dL_dout has shape {tuple(dL_dout.shape)}, but the output a[{L}] has "
                         f"shape {tuple(model.a[L].shape)}; run forward on this batch first.")

    delta = dL_dout * model.f[L].derivative(model.z[L], model.a[L])
    for l in range(L, 0, -1):
        layer = model.linear(l)
        a_prev = model.a[l - 1]
        torch.mm(delta.t(), a_prev, out=_slot(model.dL_dw, l, layer.weight, store_grad))
        torch.sum(delta, dim=0, out=_slot(model.dL_db, l, layer.bias, store_grad))
        if debug:
            logger.info("layer %d: delta %s, a[%d] %s -> dL_dw %s, dL_db %s", l, tuple(delta.shape),
                        l - 1, tuple(a_prev.shape), tuple(model.dL_dw[l].shape),
                        tuple(model.dL_db[l].shape))
        if store_grad:
            layer.weight.grad = model.dL_dw[l]
            layer.bias.grad = model.dL_db[l]
        if l > 1:
            delta = torch.mm(delta, layer.weight)
            delta.mul_(model.f[l - 1].derivative(model.z[l - 1], model.a[l - 1]))


def _slot(slots: dict[int, torch.Tensor], l: int, parameter: torch.nn.Parameter,
          store_grad: bool) -> torch.Tensor:
    """Return gradient slot ``l`` for this pass to overwrite.

    A new tensor replaces the slot when the model moved to another dtype or device. It also
    replaces a slot that is still the parameter's ``.grad`` when this pass must not touch ``.grad``.
    """
    slot = slots[l]
    if (slot.dtype != parameter.dtype or slot.device != parameter.device
            or (not store_grad and slot is parameter.grad)):
        slots[l] = slot = torch.zeros_like(parameter)
    return slot
