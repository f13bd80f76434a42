"""A fully connected network that keeps what manual backpropagation needs.

Notation, for layers ``l = 1 .. L`` and a batch of ``B`` samples:

    a[0] = x                              shape (B, n[0])
    z[l] = a[l-1] @ W[l].T + b[l]         shape (B, n[l]),  W[l]: (n[l], n[l-1]),  b[l]: (n[l],)
    a[l] = f[l](z[l])                     shape (B, n[l])

``W[l]`` and ``b[l]`` are the weight and bias of an ``nn.Linear``, so PyTorch optimizers,
``state_dict`` and autograd work on the same parameters as the manual code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

N_INPUTS = 3 * 32 * 32  # a flattened CIFAR-10 image


@dataclass(frozen=True)
class Activation:
    """An element-wise activation ``f`` with its derivative.

    ``derivative(z, a)`` returns ``f'(z)`` given ``z`` and ``a = f(z)``. Passing ``a`` lets tanh and
    sigmoid reuse the forward result, which is also what autograd does.
    """

    name: str
    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", torch.relu, lambda z, a: (z > 0).to(z.dtype)),
    "tanh": Activation("tanh", torch.tanh, lambda z, a: 1 - a * a),
    "sigmoid": Activation("sigmoid", torch.sigmoid, lambda z, a: a * (1 - a)),
    "identity": Activation("identity", lambda z: z, lambda z, a: torch.ones_like(z)),
}


class MLP(nn.Module):
    """Multilayer perceptron with one activation per layer and stored ``z[l]`` and ``a[l]``.

    Args:
        sizes: layer widths ``[n[0], ..., n[L]]``; ``n[0]`` is the flattened input size.
        activations: ``L`` names from ``ACTIVATIONS``, one per layer; the output layer's
            activation is the last one (``identity`` for logits).
        dtype, device: where the parameters live.

    After ``forward``, ``z[l]`` and ``a[l]`` (dicts keyed by ``l``) hold the last batch's values,
    and ``backprop.backward`` fills ``dL_dw[l]`` and ``dL_db[l]``, shaped like ``W[l]`` and ``b[l]``.
    """

    def __init__(self, sizes: Sequence[int], activations: Sequence[str],
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output width, got {list(sizes)}")
        if len(activations) != len(sizes) - 1:
            raise ValueError(f"{len(sizes) - 1} layers need {len(sizes) - 1} activations, "
                             f"got {len(activations)}: {list(activations)}")
        unknown = [name for name in activations if name not in ACTIVATIONS]
        if unknown:
            raise ValueError(f"unknown activation {unknown[0]!r}; choose from {', '.join(ACTIVATIONS)}")

        self.sizes = list(sizes)
        self.L = len(sizes) - 1
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out, dtype=dtype, device=device) for n_in, n_out in zip(sizes, sizes[1:])
        )
        self.f = {l: ACTIVATIONS[name] for l, name in enumerate(activations, start=1)}
        self.z: dict[int, torch.Tensor] = {}
        self.a: dict[int, torch.Tensor] = {}
        self.dL_dw = {l: torch.zeros_like(layer.weight) for l, layer in enumerate(self.layers, start=1)}
        self.dL_db = {l: torch.zeros_like(layer.bias) for l, layer in enumerate(self.layers, start=1)}

    def linear(self, l: int) -> nn.Linear:
        """Return the ``nn.Linear`` of layer ``l`` (1-based, as in the formulas)."""
        return self.layers[l - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute ``a[L]`` for a batch ``x`` of shape ``(B, ...)``; inputs are flattened to ``(B, n[0])``."""
        self.a = {0: x.reshape(x.shape[0], -1)}
        self.z = {}
        for l in range(1, self.L + 1):
            self.z[l] = self.linear(l)(self.a[l - 1])
            self.a[l] = self.f[l].function(self.z[l])
        return self.a[self.L]


def experiment_mlp(hidden_sizes: Sequence[int], activation: str, n_classes: int,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                   n_inputs: int = N_INPUTS) -> MLP:
    """Build the experiment's network ``n_inputs -> hidden... -> n_classes``, identity on the output."""
    sizes = [n_inputs, *hidden_sizes, n_classes]
    activations = [activation] * len(hidden_sizes) + ["identity"]
    return MLP(sizes, activations, dtype=dtype, device=device)
