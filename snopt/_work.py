"""Work: the multiply-adds the vector fields of a model spend, a budget unit fair across sizes.

NFE counts function evaluations, but one evaluation of a width-32 field costs many times
one of a width-8 field, so a strategy that searches the width gets more compute for the
same NFE.  *Work* counts what each evaluation costs:

    work = sum over function evaluations of the field's multiply-adds for the batch

How it is counted: a forward hook on every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` inside
the field of every :class:`~snopt.ODEBlock` adds the layer's multiply-adds for the input
it was called with (``batch x out_features x in_features`` for a linear layer,
``output elements x in_channels / groups x kernel elements`` for a convolution); biases,
activations and normalisations are not counted (they are linear in the state size, the
products are not).  A field evaluation is counted when the block counts it as NFE (inside
a solve: the forward solve, the backward adjoint solve and the dL/dT evaluation) and the
model is in training mode, so validation is not counted, like NFE.  A backward evaluation
counts the same multiply-adds as a forward one: work is evaluations weighted by their
size, not a FLOP count of the vector-Jacobian products.  Layers outside the ODE blocks
(stem, head) are not counted: they run once per step whatever the horizon.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ._ode import ODEBlock, ode_blocks

#: Layer types whose multiply-adds are counted.
COUNTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_macs(layer: nn.Module, output: Tensor) -> int:
    """Multiply-adds of one call of a Linear or Conv layer that produced ``output``.

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv1d/2d/3d``.
        output: the tensor the call returned.

    Returns:
        ``output.numel() * in_features`` for a linear layer, and
        ``output.numel() * in_channels / groups * prod(kernel_size)`` for a convolution.

    Raises:
        TypeError: for another layer type.
    """
    if isinstance(layer, nn.Linear):
        return int(output.numel()) * int(layer.in_features)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        per_output = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return int(output.numel()) * int(per_output)
    raise TypeError(f"`layer` must be an nn.Linear or nn.Conv1d/2d/3d, but got {type(layer).__name__}.")


class WorkCounter:
    """Count the work (multiply-adds of the fields' layers) of every ODE block of a model.

    Install with :meth:`attach` (or use as a context manager); read :attr:`total` or
    :attr:`per_block`; :meth:`detach` removes the hooks.

    Args:
        model: a model holding :class:`~snopt.ODEBlock` modules (or one block).

    Example::

        with WorkCounter(model) as work:
            loss = task.loss(model, batch); loss.backward()
        print(work.total)
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, but got {type(model).__name__}.")
        self.model = model
        self.per_block: dict[str, int] = {}
        self._handles: list[Any] = []

    @property
    def total(self) -> int:
        """Work counted so far, summed over blocks."""
        return sum(self.per_block.values())

    def attach(self) -> WorkCounter:
        """Add the forward hooks (once); returns ``self``."""
        if self._handles:
            return self
        for name, block in _blocks(self.model):
            self.per_block.setdefault(name, 0)
            for layer in block.func.modules():
                if isinstance(layer, COUNTED_LAYERS):
                    self._handles.append(layer.register_forward_hook(self._hook(name, block)))
        return self

    def detach(self) -> None:
        """Remove the hooks; the counts stay."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Set every count to zero."""
        self.per_block = dict.fromkeys(self.per_block, 0)

    def _hook(self, name: str, block: ODEBlock) -> Any:
        def hook(layer: nn.Module, inputs: Any, output: Tensor) -> None:
            # Counted like NFE: inside one of the block's solves, in training mode.
            if block._run is not None and block.training:
                self.per_block[name] += layer_macs(layer, output)

        return hook

    def __enter__(self) -> WorkCounter:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _blocks(model: nn.Module) -> Iterable[tuple[str, ODEBlock]]:
    if isinstance(model, ODEBlock):
        return [("", model)]
    return ode_blocks(model)
