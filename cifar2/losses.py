"""Losses with their gradient with respect to the network output.

Each loss takes the output ``y_hat`` of shape ``(B, K)`` and a target, and returns a scalar.
``gradient`` returns ``dL/dy_hat`` of shape ``(B, K)``, which is where the manual backward pass
starts, so one backward pass serves every loss here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SumSquaredError:
    """``L = sum_{i,k} (y_hat[i,k] - y[i,k])**2`` with ``dL/dy_hat = 2 (y_hat - y)``; ``y`` is ``(B, K)``."""

    name = "sse"

    def __call__(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((y_hat - y) ** 2).sum()

    def gradient(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2 * (y_hat - y)


class CrossEntropy:
    """Cross-entropy of logits with mean reduction over the batch; ``y`` contains class ids ``(B,)``.

    ``L = -(1/B) sum_i log softmax(y_hat[i])[y[i]]`` and ``dL/dy_hat = (softmax(y_hat) - onehot(y)) / B``.
    """

    name = "cross_entropy"

    def __call__(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(y_hat, y)

    def gradient(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Same formula, evaluated in the order autograd uses (PyTorch 2.x): the gradient of the
        # mean negative log-likelihood with respect to the log-probabilities is g = -onehot / B,
        # and the log-softmax step maps it to g - softmax * sum(g). Following that order keeps
        # most entries equal to autograd's. PyTorch's fused log-softmax backward kernel rounds
        # the others differently in the last bit (about 6% of the entries for random 256 x 2
        # float64 logits, a measured estimate).
        batch = y_hat.shape[0]
        onehot = F.one_hot(y, num_classes=y_hat.shape[1]).to(y_hat.dtype)
        g = onehot * (-1.0 / batch)
        probabilities = torch.exp(torch.log_softmax(y_hat, dim=1))
        return g - probabilities * g.sum(dim=1, keepdim=True)
