"""An inference copy of a network: the same function with fewer passes over memory.

At 256² the student's convolutions are not what costs most on a CPU: its thin full-resolution maps are
written and read again by BatchNorm, ReLU, max pooling and the decoder's concatenations, each one pass
over memory (docs/export.md, "A faster PyTorch network"). :func:`fuse_for_inference` returns a copy that
computes the same logits (equal up to float rounding) without most of those passes:

- **BatchNorm folded** into the convolution before it (eval mode: ``y = s * conv(x) + t`` is a
  convolution with scaled weights and a bias; :func:`torch.nn.utils.fusion.fuse_conv_bn_eval`), and the
  ReLU after it in place;
- **no concatenation in the decoder**: a convolution of ``cat([up, skip])`` is the sum of one
  convolution of ``up`` and one of ``skip`` (the weight split along its input channels), so the
  concatenated map is never written;
- **2x2 max pooling** as the maximum of four strided views (the same values; PyTorch's CPU kernel for
  channels-last maps also computes the indices it does not need).

The original network is not changed. Networks without these layers come back as a plain copy.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mkd.networks.blocks import UpBlock, _match_size

__all__ = ["fuse_for_inference"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with BatchNorm folded, ReLU in place, no decoder concatenation.

    Args:
        model: any network; the mkd U-Nets (students, teachers) gain most.

    Returns:
        the inference copy (eval mode, ``requires_grad`` off). Its output equals ``model.eval()``'s up to
        float rounding (``tests/networks/test_fusion.py``: max |difference| of the logits below 1e-4).
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, Convolution):
            _fold_batch_norm(module)
    _replace(fused)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused


def _fold_batch_norm(unit: Convolution) -> None:
    """Fold ``unit.adn.N`` (BatchNorm with running statistics) into ``unit.conv``; ReLU in place."""
    adn = getattr(unit, "adn", None)
    norm = getattr(adn, "N", None) if adn is not None else None
    conv = getattr(unit, "conv", None)
    if isinstance(norm, _BATCH_NORMS) and norm.track_running_stats and isinstance(conv, nn.modules.conv._ConvNd):
        if not isinstance(conv, nn.modules.conv._ConvTransposeNd):
            unit.conv = fuse_conv_bn_eval(conv, norm)
            adn.N = nn.Identity()
    act = getattr(adn, "A", None) if adn is not None else None
    if isinstance(act, nn.ReLU):
        act.inplace = True


def _replace(parent: nn.Module) -> None:
    """Swap every UpBlock for a :class:`_SplitUpBlock` and every 2x2 max pooling for :class:`_MaxPool2x2`."""
    for name, child in parent.named_children():
        if isinstance(child, UpBlock) and _SplitUpBlock.applies(child):
            setattr(parent, name, _SplitUpBlock(child))
        elif _MaxPool2x2.applies(child):
            setattr(parent, name, _MaxPool2x2())
        else:
            _replace(child)


class _SplitUpBlock(nn.Module):
    """:class:`UpBlock` whose first convolution runs on ``up`` and ``skip`` separately, summed."""

    def __init__(self, block: UpBlock) -> None:
        super().__init__()
        first = block.conv[0]
        conv = first.conv
        n_up = conv.in_channels - int(block.skip_channels)
        self.up = block.up
        self.conv_up = _conv_like(conv, conv.weight[:, :n_up], conv.bias)
        self.conv_skip = _conv_like(conv, conv.weight[:, n_up:], None)
        self.adn = first.adn if hasattr(first, "adn") else nn.Identity()
        self.rest = nn.Sequential(*list(block.conv)[1:])

    @staticmethod
    def applies(block: UpBlock) -> bool:
        first = block.conv[0] if len(block.conv) else None
        conv = getattr(first, "conv", None)
        return (
            isinstance(first, Convolution)
            and type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            and conv.groups == 1
            and 0 < int(getattr(block, "skip_channels", 0)) < conv.in_channels
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is None:
            raise ValueError("this decoder block was built with a skip connection; got none")
        y = self.conv_up(_match_size(x, skip))
        y += self.conv_skip(skip)
        return self.rest(self.adn(y))


def _conv_like(conv: nn.modules.conv._ConvNd, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A convolution with ``conv``'s geometry and the given (input-channel slice of its) weight."""
    new = type(conv)(
        weight.shape[1],
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
    )
    new.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new.to(conv.weight.device)


class _MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` as the maximum of four strided views (odd sides floored, as the pool does)."""

    @staticmethod
    def applies(module: nn.Module) -> bool:
        if type(module) is not nn.MaxPool2d:
            return False
        k, s = module.kernel_size, module.stride
        two = (2, (2, 2))
        return (
            k in two and s in two and module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1))
            and not module.ceil_mode and not module.return_indices
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
        return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))
