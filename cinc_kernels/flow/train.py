"""Training the flow: bits/dim with uniform dequantisation, Adam(ax) with warm-up and gradient clipping, a progress
bar, plots, sample grids, atomic checkpoints with exact resume, and DDP under ``torchrun``.

Single process::

    python -m cinc_kernels.flow train                     # digits, preset digits-small, into runs/digits

Several processes or machines (one per GPU; on CPUs the gloo backend)::

    torchrun --nproc-per-node=8 -m cinc_kernels.flow train --data cifar10 --data-root ~/data --preset cifar10

``batch_size`` is per process. Every process draws its own share of each epoch (``DistributedSampler``), gradients
are averaged by DDP, metrics are all-reduced, and only rank 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .data import ImageData, dequantize, describe, load_data
from .model import CInCFlow, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainConfig",
    "atomic_save",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "save_grid",
    "train",
]

CHECKPOINT_FORMAT = "cinc_kernels.flow/1"


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` beside the checkpoint."""

    name: str = "digits"
    out_dir: Optional[str] = None  # default runs/<name>
    data: str = "digits"
    data_root: Optional[str] = None
    n_bits: Optional[int] = None
    image_size: Optional[int] = None
    preset: Optional[str] = "digits-small"
    levels: Optional[int] = None
    steps_per_level: Optional[int] = None
    hidden_channels: Optional[int] = None
    conv: str = "cinc"
    coupling: str = "quad"
    backend: str = "auto"
    conv_kwargs: dict = dataclasses.field(default_factory=dict)
    permutation: str = "reverse"
    steps: int = 2500
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    warmup: int = 200
    grad_clip: float = 50.0
    eval_every: int = 500
    sample_every: int = 1000
    checkpoint_every: int = 500
    temperatures: tuple = (0.5, 0.7, 1.0)
    n_samples: int = 64
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threads: int = 1  # torch intra-op CPU threads (0: PyTorch's default)

    def resolved_out_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)


# ------------------------------------------------------------------------------------------------------------
# files


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``: a crash
    at any moment leaves either the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`train`, with clear errors for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, … for damaged files
        raise RuntimeError(f"checkpoint {path!r} is corrupt or truncated and cannot be read "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"checkpoint {path!r} is not a cinc_kernels.flow checkpoint (expected format "
                           f"{CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("model_config", "model", "step") if k not in ckpt]
    if missing:
        raise RuntimeError(f"checkpoint {path!r} is incomplete: it lacks {', '.join(missing)}")
    return ckpt


def load_model(path: str, device="cpu", backend: Optional[str] = None) -> tuple[CInCFlow, dict]:
    """The model saved in a checkpoint, in eval mode on ``device``, and the checkpoint itself."""
    ckpt = load_checkpoint(path)
    config = CInCFlow.upgrade_config(ckpt["model_config"])
    if backend is not None:
        config["backend"] = backend
    model = CInCFlow(**config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path!r} does not match its own model configuration: {exc}") from None
    return model.to(device).eval(), ckpt


def save_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None, padding: int = 1,
              scale: int = 1) -> None:
    """Write ``(N, C, H, W)`` images in ``[0, 1]`` (clamped) as one PNG grid, ``nrow`` images a row."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / nrow))
    grid = torch.ones(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid * 255).round().to(torch.uint8)
    array = array[0] if c == 1 else array.permute(1, 2, 0)
    image = Image.fromarray(array.numpy())
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def _plot_history(history: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, bpd = history["train_step"], history["train_bpd"]
    if steps:
        ax.plot(steps, bpd, color="tab:blue", alpha=0.25, linewidth=0.8)
        k = max(1, len(bpd) // 50)
        smooth = [sum(bpd[max(0, i - k + 1):i + 1]) / len(bpd[max(0, i - k + 1):i + 1]) for i in range(len(bpd))]
        ax.plot(steps, smooth, color="tab:blue", label="train (running mean)")
    if history["test_step"]:
        ax.plot(history["test_step"], history["test_bpd"], "o-", color="tab:red", label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.set_title(title)
    finite = [b for b in bpd[len(bpd) // 10:] + history["test_bpd"] if math.isfinite(b)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------
# distributed helpers


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; starts the process group under torchrun (``WORLD_SIZE`` > 1) if nobody has."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------------------
# evaluation


def _eval_noise(indices: list[int], shape, seed: int) -> torch.Tensor:
    """Dequantisation noise for test images ``indices``: image ``i`` always gets the noise of seed ``seed + i``,
    so test bits/dim do not depend on the batch size or the number of processes."""
    g = torch.Generator()
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g.manual_seed(seed * 1_000_003 + i)
        out[row] = torch.rand(shape, generator=g)
    return out


@torch.no_grad()
def evaluate(model: CInCFlow, dataset, num_levels: int, batch_size: int = 256, device="cpu", seed: int = 0) -> float:
    """Mean test bits/dim of ``dataset``, over all processes when distributed (each rank takes every
    ``world``-th image, the sums are all-reduced). The dequantisation noise is fixed per image (see
    :func:`_eval_noise`), so the result is the same for any batch size and number of processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    indices = list(range(rank, len(dataset), world))
    total, count = 0.0, 0
    n_bits = math.log2(num_levels)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        levels = torch.stack([dataset[i][0] for i in chunk])
        u = _eval_noise(chunk, levels.shape[1:], seed)
        x = ((levels.float() + u) / num_levels).to(device)
        bpd = model.bits_per_dim(x, n_bits)
        total += float(bpd.double().sum())
        count += x.shape[0]
    total, count = _all_reduce_sum([total, count], device)
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------------------
# training


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr)
    raise ValueError(f"optimizer must be adam or adamax, got {cfg.optimizer!r}")


def _warmup_factor(cfg: TrainConfig):
    # Linear warm-up from lr/warmup to lr, then constant: a schedule that depends on the step alone, so that
    # extending a run (resume with more steps) changes nothing before the old end.
    return lambda step: min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0


def _epoch_batches(dataset, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded shuffle shared by all ranks, cut by ``DistributedSampler``."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def _check_config(cfg: TrainConfig) -> None:
    for name in ("steps", "batch_size", "eval_every", "sample_every", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")


def build_from_config(cfg: TrainConfig, data: ImageData) -> CInCFlow:
    c, h, w = data.shape
    if h != w:
        raise ValueError(f"the data's images are {h}×{w}; square images are expected")
    return build_model(cfg.preset, in_channels=c, image_size=h, levels=cfg.levels,
                       steps_per_level=cfg.steps_per_level, hidden_channels=cfg.hidden_channels, conv=cfg.conv,
                       coupling=cfg.coupling, backend=cfg.backend,
                       conv_kwargs=dict(cfg.conv_kwargs) or None, permutation=cfg.permutation)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, data: Optional[ImageData] = None) -> dict:
    """Train (or, with ``resume``, continue) the run of ``cfg``; returns its history and final test bits/dim.

    Writes into ``cfg.out_dir``: ``checkpoint.pt`` (atomic), ``config.json``, ``metrics.json``, ``loss.png`` and
    ``samples/step_<N>_T<t>.png``. With ``resume`` the run restarts from ``checkpoint.pt`` exactly where it stopped
    (model, optimiser, schedule, data order, dequantisation noise): the next steps' losses equal those of a run
    that never stopped.
    """
    _check_config(cfg)
    if cfg.threads > 0:
        # One thread is the fastest for the small presets, and on a shared machine two OpenMP threads that
        # spin-wait for a busy core made a digits step 15× slower (0.07 s → 1.5 s, 2 cores at load 6).
        torch.set_num_threads(cfg.threads)
    rank, world = _distributed()
    device = _device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = cfg.resolved_out_dir()
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    data = data or load_data(cfg.data, cfg.data_root, n_bits=cfg.n_bits, image_size=cfg.image_size)
    n_bits = data.n_bits
    dims = math.prod(data.shape)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_from_config(cfg, data).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(cfg))
    # Dequantisation noise has its own generator per rank, saved in the checkpoint: resuming replays it exactly.
    noise = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    history = {"train_step": [], "train_bpd": [], "test_step": [], "test_bpd": [], "images_per_s": []}
    step = 0

    if resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if CInCFlow.upgrade_config(ckpt["model_config"]) != model.config:
            raise ValueError(f"cannot resume: {ckpt_path} holds a model with {ckpt['model_config']}, these settings "
                             f"build {model.config}; use the run's own settings (its config.json) or another out_dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, history = ckpt["step"], ckpt["history"]
        states = ckpt["rng"]
        if states["world_size"] == world:
            noise.set_state(states["noise"][rank].cpu())
            torch.set_rng_state(states["torch"][rank].cpu())
        elif rank == 0:
            print(f"resuming with {world} processes instead of {states['world_size']}: the data order is kept, "
                  f"the dequantisation noise is not", file=sys.stderr)
    elif resume and rank == 0:
        print(f"no checkpoint at {ckpt_path}; starting a new run", file=sys.stderr)

    if rank == 0:
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        saved = dataclasses.asdict(cfg)
        if data.info:
            saved["data_info"] = data.info
            print(describe(data), file=sys.stderr)
        _atomic_write_text(json.dumps(saved, indent=2) + "\n", os.path.join(out_dir, "config.json"))

    batches_per_epoch = len(data.train) // (cfg.batch_size * world)
    if batches_per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} × {world} processes exceeds the {len(data.train)} "
                         f"training images")

    def batches_from(start: int):
        epoch, offset = divmod(start, batches_per_epoch)
        while True:
            lists = _epoch_batches(data.train, cfg.batch_size, epoch, cfg.seed, rank, world)[offset:]
            loader = DataLoader(data.train, batch_sampler=lists, num_workers=cfg.num_workers,
                                pin_memory=device.type == "cuda")
            for levels, _ in loader:
                yield levels
            epoch, offset = epoch + 1, 0

    if step == 0:
        # ActNorm's data-dependent initialisation, before DDP wraps the model: DDP then broadcasts rank 0's
        # statistics to every rank. Its own noise generator keeps the training noise stream untouched.
        first = next(batches_from(0)).to(device)
        init_noise = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.no_grad():
            model.train()(dequantize(first, data.num_levels, init_noise))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    net.train()
    sample_generator_seed = cfg.seed + 12345

    def write_outputs():
        """Checkpoint, metrics, plot (rank 0 writes; every rank contributes its RNG state)."""
        states = {"world_size": world, "noise": _gather(noise.get_state().cpu()),
                  "torch": _gather(torch.get_rng_state())}
        if rank == 0:
            atomic_save({
                "format": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(cfg),
                "model_config": model.config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "history": history,
                "rng": states,
                "data": {"name": data.name, "num_levels": data.num_levels, "shape": list(data.shape),
                         "classes": data.classes, "info": data.info},
            }, ckpt_path)
            _atomic_write_text(json.dumps(history) + "\n", os.path.join(out_dir, "metrics.json"))
            _plot_history(history, os.path.join(out_dir, "loss.png"),
                          f"{cfg.name}: {cfg.conv} + {cfg.coupling} on {cfg.data}")
        _barrier()

    def write_samples():
        if rank == 0:
            model.eval()
            for t in cfg.temperatures:
                g = torch.Generator(device=device).manual_seed(sample_generator_seed)
                images = model.sample(cfg.n_samples, t, generator=g)
                save_grid(images, os.path.join(out_dir, "samples", f"step_{step:06d}_T{t:.2f}.png"),
                          scale=max(1, 64 // data.shape[1]))
            model.train()
        _barrier()

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, unit="step", dynamic_ncols=True)
    stream = batches_from(step)
    smoothed_bpd, smoothed_rate, skipped = None, None, 0
    while step < cfg.steps:
        tic = time.perf_counter()
        levels = next(stream).to(device, non_blocking=True)
        x = dequantize(levels, data.num_levels, noise)
        bpd = CInCFlow.bits_per_dim_from_log_prob(net(x), dims, n_bits)
        loss = bpd.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # Gradients are identical on all ranks after DDP's all-reduce, so every rank takes the same decision.
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1
        scheduler.step()
        step += 1
        mean_bpd = _all_reduce_sum([float(loss.detach())], device)[0] / world
        rate = cfg.batch_size * world / max(time.perf_counter() - tic, 1e-9)
        history["train_step"].append(step)
        history["train_bpd"].append(mean_bpd)
        history["images_per_s"].append(rate)
        if math.isfinite(mean_bpd):
            smoothed_bpd = mean_bpd if smoothed_bpd is None else 0.95 * smoothed_bpd + 0.05 * mean_bpd
        smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
        if bar is not None:
            postfix = {"bpd": f"{smoothed_bpd:.3f}" if smoothed_bpd is not None else "nan",
                       "img/s": f"{smoothed_rate:.0f}"}
            if history["test_bpd"]:
                postfix["test"] = f"{history['test_bpd'][-1]:.3f}"
            if skipped:
                postfix["skipped"] = skipped
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        last = step == cfg.steps
        if step % cfg.eval_every == 0 or last:
            history["test_step"].append(step)
            history["test_bpd"].append(evaluate(model, data.test, data.num_levels, device=device, seed=cfg.seed))
        if step % cfg.sample_every == 0 or last:
            write_samples()
        if step % cfg.checkpoint_every == 0 or last:
            write_outputs()
    if bar is not None:
        bar.close()
    if not history["test_bpd"]:  # resumed a finished run
        history["test_step"].append(step)
        history["test_bpd"].append(evaluate(model, data.test, data.num_levels, device=device, seed=cfg.seed))
    return {"history": history, "test_bpd": history["test_bpd"][-1], "out_dir": out_dir, "step": step,
            "skipped_steps": skipped, "model": model}
