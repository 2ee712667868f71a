"""Test bits/dim and the round-trip error of a model on a data set, with dequantisation noise fixed per image so
that neither depends on the batch size or the number of processes."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

from .data import ImageData, load_data
from .distributed import all_reduce_sum, rank_and_world
from .model import CInCFlow

__all__ = ["data_for_model", "eval_noise", "evaluate", "reconstruction_error"]


def _trained_levels(ckpt: dict[str, Any]) -> int | None:
    """The number of pixel levels the checkpoint's model was trained on (``None`` where the checkpoint does not
    say)."""
    data = ckpt.get("data")
    if isinstance(data, dict) and isinstance(data.get("num_levels"), int):
        return int(data["num_levels"])
    n_bits = (ckpt.get("config") or {}).get("n_bits")
    return 2 ** n_bits if isinstance(n_bits, int) else None


def data_for_model(ckpt: dict[str, Any], *, data: str | None = None, data_root: str | None = None,
                   n_bits: int | None = None, image_size: int | None = None) -> ImageData:
    """The data a checkpoint's model is evaluated or edited on (``eval``/``edit``): ``data`` (default: the run's),
    from ``data_root`` and at ``image_size`` (default: the run's), reduced to the bits per pixel the model was
    trained at, whichever data set it is.

    Bits/dim depend on the number of pixel levels, so an ``n_bits`` that differs from the model's, or data whose
    levels differ, is refused (``ValueError`` naming ``--n-bits`` or ``--data``) instead of reporting a number
    that compares with nothing.
    """
    cfg = ckpt.get("config") or {}
    levels = _trained_levels(ckpt)
    if n_bits is not None and levels is not None and 2 ** n_bits != levels:
        raise ValueError(f"--n-bits {n_bits}: the model was trained on {levels} levels per pixel, not "
                         f"{2 ** n_bits}; its bits/dim at another number of levels mean nothing. Leave --n-bits out "
                         f"to use the model's")
    name = data or cfg.get("data", "digits")
    loaded = load_data(name, data_root if data_root is not None else cfg.get("data_root"),
                       n_bits=n_bits if n_bits is not None else cfg.get("n_bits"),
                       image_size=image_size if image_size is not None else cfg.get("image_size"))
    if levels is not None and loaded.num_levels != levels:
        raise ValueError(f"--data {name}: these images have {loaded.num_levels} levels per pixel, the model was "
                         f"trained on {levels}; its bits/dim on them mean nothing")
    return loaded


def eval_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Dequantisation noise for test images ``indices``: image ``i`` always gets the noise of seed ``seed + i``,
    so test bits/dim do not depend on the batch size or the number of processes."""
    g = torch.Generator()
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[row] = torch.rand(tuple(shape), generator=g)
    return out


@torch.no_grad()
def evaluate(model: CInCFlow, dataset: Any, num_levels: int, batch_size: int = 256,
             device: torch.device | str = "cpu", seed: int = 0) -> float:
    """Mean test bits/dim of ``dataset``, over all processes when distributed (each rank takes every
    ``world``-th image, the sums are all-reduced). The dequantisation noise is fixed per image (see
    :func:`eval_noise`), so the result is the same for any batch size and number of processes."""
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(dataset), world))
    total, count = 0.0, 0.0
    n_bits = math.log2(num_levels)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        levels = torch.stack([dataset[i][0] for i in chunk])
        u = eval_noise(chunk, levels.shape[1:], seed)
        x = ((levels.float() + u) / num_levels).to(device)
        bpd = model.bits_per_dim(x, n_bits)
        total += float(bpd.double().sum())
        count += x.shape[0]
    total, count = all_reduce_sum([total, count], device)
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def reconstruction_error(model: CInCFlow, dataset: Any, num_levels: int, batch_size: int = 256,
                         device: torch.device | str = "cpu", seed: int = 0,
                         limit: Optional[int] = None) -> dict[str, Any]:
    """How exactly ``decode(encode(x))`` returns the test images ``x`` (dequantised as in :func:`evaluate`):
    ``{"images", "max_abs_error", "mean_abs_error", "non_finite"}``, errors in data units (one level is
    ``1 / num_levels``), ``non_finite`` the number of images whose reconstruction holds inf/NaN."""
    was_training = model.training
    model.eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    worst, total, count, non_finite = 0.0, 0.0, 0, 0
    for start in range(0, n, batch_size):
        chunk = list(range(start, min(start + batch_size, n)))
        levels = torch.stack([dataset[i][0] for i in chunk])
        x = ((levels.float() + eval_noise(chunk, levels.shape[1:], seed)) / num_levels).to(device)
        error = (model.decode(model.encode(x)) - x).abs().flatten(1).double()
        finite = torch.isfinite(error).all(dim=1)
        non_finite += int((~finite).sum())
        if bool(finite.any()):
            worst = max(worst, float(error[finite].max()))
            total += float(error[finite].sum())
            count += int(finite.sum()) * error.shape[1]
    model.train(was_training)
    return {"images": n, "max_abs_error": worst, "mean_abs_error": total / max(count, 1), "non_finite": non_finite}
