"""Training the flow: bits/dim with uniform dequantisation, Adam(ax) with warm-up and gradient clipping, a progress
bar, plots, sample grids, atomic checkpoints with exact resume, and DDP under ``torchrun``.

Single process::

    python -m cinc_kernels.flow train                     # digits, preset digits-small, into runs/digits

Several processes or machines (one per GPU; on CPUs the gloo backend)::

    torchrun --nproc-per-node=8 -m cinc_kernels.flow train --data cifar10 --data-root ~/data --preset cifar10

``batch_size`` is per process. Every process draws its own share of each epoch (``DistributedSampler``), gradients
are averaged by DDP, metrics are all-reduced, and only rank 0 writes files.

This module is the loop and its signals; the settings are :mod:`.config`, the files :mod:`.checkpoint` and
:mod:`.plots`, the folder :mod:`.run_folder`, the processes :mod:`.distributed`, the test metrics :mod:`.evaluation`.
Their public names are importable from here too.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .._optional import optional_import
from .checkpoint import (
    CHECKPOINT_FORMAT,
    DiskFullError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from .config import (
    FIELD_RANGES,
    OPTIMIZERS,
    TEMPERATURE,
    Range,
    TrainConfig,
    check_config,
    check_name,
    resume_differences,
)
from .data import ImageData, dequantize, describe, load_data, random_horizontal_flip
from .distributed import all_reduce_sum, barrier, gather, init_distributed, resolve_device
from .evaluation import eval_noise, evaluate, reconstruction_error
from .model import CInCFlow, build_model
from .plots import grid_scale, grid_tensor, sample_batches, save_grid, write_grid
from .plots import plot_history as _plot_history
from .run_folder import (
    RunLock,
    check_resume,
    claim_run_folder,
    refuse_existing_run,
    release_unused_folder,
    remove_previous_run,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "FIELD_RANGES",
    "OPTIMIZERS",
    "TEMPERATURE",
    "DiskFullError",
    "Range",
    "RunInterrupted",
    "RunLock",
    "TrainConfig",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_from_config",
    "check_config",
    "check_name",
    "eval_noise",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "reconstruction_error",
    "resolve_device",
    "resume_differences",
    "save_checkpoint",
    "save_grid",
    "train",
]


class RunInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint from which ``--resume`` continues exactly."""

    def __init__(self, step: int, path: str, signum: int):
        self.step, self.path, self.signum = step, path, signum
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}; saved {path} "
                         f"(continue with --resume)")


def _make_optimizer(cfg: TrainConfig, params: Iterator[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr)
    raise ValueError(f"optimizer must be adam or adamax, got {cfg.optimizer!r}")


def _warmup_factor(cfg: TrainConfig) -> Callable[[int], float]:
    # Linear warm-up from lr/warmup to lr, then constant: a schedule that depends on the step alone, so that
    # extending a run (resume with more steps) changes nothing before the old end.
    return lambda step: min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0


def _epoch_batches(dataset: Any, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded shuffle shared by all ranks, cut by ``DistributedSampler``."""
    sampler: DistributedSampler[Any] = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def build_from_config(cfg: TrainConfig, data: ImageData) -> CInCFlow:
    """The model ``cfg`` describes, for images of ``data``'s shape."""
    c, h, w = data.shape
    if h != w:
        raise ValueError(f"the data's images are {h}×{w}; square images are expected")
    try:
        return build_model(cfg.preset, in_channels=c, image_size=h, levels=cfg.levels,
                           steps_per_level=cfg.steps_per_level, hidden_channels=cfg.hidden_channels, conv=cfg.conv,
                           coupling=cfg.coupling, backend=cfg.backend,
                           conv_kwargs=dict(cfg.conv_kwargs) or None, permutation=cfg.permutation)
    except TypeError as exc:  # a conv_kwargs value of the wrong type
        raise ValueError(f"conv_kwargs {cfg.conv_kwargs}: {exc}") from None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          data: Optional[ImageData] = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue) the run of ``cfg``; returns its history and final test bits/dim.

    Writes into ``cfg.out_dir``, every file atomically: ``checkpoint.pt`` (with checksums), ``config.json``,
    ``metrics.json``, ``loss.png``, ``samples/step_<N>_T<t>.png`` and, with ``cfg.tensorboard``, ``tensorboard/``.

    - A folder that already holds a run is refused unless ``resume`` (continue it) or ``overwrite`` (delete what
      it wrote, then start afresh). The folder is locked for the whole run: a second run into it fails at once,
      naming the holder.
    - With ``resume`` the run restarts from ``checkpoint.pt`` exactly where it stopped (model, optimiser,
      schedule, data order, dequantisation noise): the next steps equal those of a run that never stopped. Settings
      that would change that are refused before anything is written, each named (:func:`resume_differences`).
    - SIGINT/SIGTERM finish the current step, save a checkpoint and raise :class:`RunInterrupted`; a second signal
      stops at once (the files on disk stay whole).
    """
    check_config(cfg)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if cfg.threads > 0:
        # One thread is the fastest for the small presets; with more threads than idle cores, OpenMP's waits for
        # descheduled threads cost milliseconds per call whatever the work (benchmarks/results/cpu_ops.md).
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rank, world = init_distributed()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = cfg.resolved_out_dir()
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    lock: Optional[RunLock] = None
    created = False
    if rank == 0:
        # Refusals that need no lock come first, so that a refused command touches nothing in the folder.
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"out_dir {out_dir!r} is a file, not a folder")
        refuse_existing_run(out_dir, resume, overwrite)
        if resume and os.path.isfile(ckpt_path):
            check_resume(load_checkpoint(ckpt_path), cfg, ckpt_path)
        lock, created = claim_run_folder(out_dir, resume, overwrite)
    signals = _StopSignals()
    writer = None
    try:
        # Start-up: everything that can refuse the run, up to the model's first forward pass. Nothing is written
        # before it has passed, so a refused run leaves the folder as it found it (and the next run is not taken
        # for a second one), and --overwrite deletes the old run only once the new one can start.
        try:
            data = data or load_data(cfg.data, cfg.data_root, n_bits=cfg.n_bits, image_size=cfg.image_size)
            sample_scale = grid_scale(cfg.n_samples, (data.shape[1], data.shape[2]), "n_samples")
            writer_class = _tensorboard_writer_class() if cfg.tensorboard and rank == 0 else None
            state = _start(cfg, data, device, rank, world, resume, ckpt_path)
            state["sample_scale"] = sample_scale
        except BaseException:
            if lock is not None:
                release_unused_folder(lock, out_dir, created)
            raise
        if rank == 0:
            if overwrite:
                remove_previous_run(out_dir)
            os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
            saved = dataclasses.asdict(cfg)
            if data.info:
                saved["data_info"] = data.info
                print(describe(data), file=sys.stderr)
            atomic_write_text(json.dumps(saved, indent=2) + "\n", os.path.join(out_dir, "config.json"))
            if writer_class is not None:
                # purge_step drops events a killed run logged after its last checkpoint, which the resumed run
                # logs again.
                start = state["step"]
                writer = writer_class(os.path.join(out_dir, "tensorboard"), purge_step=start if start > 0 else None)
        signals.install()
        return _run(cfg, data, device, rank, world, state, out_dir, ckpt_path, progress, signals, writer)
    finally:
        signals.restore()
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.release()


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (it then saves); a second one interrupts at
    once. Installed only in the main thread (Python delivers signals there)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _tensorboard_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter


def _start(cfg: TrainConfig, data: ImageData, device: torch.device, rank: int, world: int, resume: bool,
           ckpt_path: str) -> dict[str, Any]:
    """The model, optimiser, schedule, noise and history to train from: new (ActNorm initialised on the first
    batch), or restored from the checkpoint after checking that resuming continues the run exactly. Every check of
    the run's start-up happens here or before; it writes nothing."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_from_config(cfg, data).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor(cfg))
    # Dequantisation noise has its own generator per rank, saved in the checkpoint: resuming replays it exactly.
    noise = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    history: dict[str, list[Any]] = {"train_step": [], "train_bpd": [], "test_step": [], "test_bpd": [],
                                     "images_per_s": []}
    step = 0
    if resume and os.path.isfile(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        notes = check_resume(ckpt, cfg, ckpt_path)
        if CInCFlow.upgrade_config(ckpt["model_config"]) != model.config:
            raise ValueError(f"cannot resume: {ckpt_path} holds a model with {ckpt['model_config']}, these settings "
                             f"build {model.config}; use the run's own settings (its config.json) or another out_dir")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step, history = ckpt["step"], ckpt["history"]
            states = ckpt["rng"]
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"cannot resume: {ckpt_path} does not hold a complete training state "
                             f"({type(exc).__name__}: {exc})") from None
        if states["world_size"] == world:
            noise.set_state(states["noise"][rank].cpu())
            torch.set_rng_state(states["torch"][rank].cpu())
        elif rank == 0:
            notes.append(f"{world} processes instead of {states['world_size']}: the data order is kept, the "
                         f"dequantisation noise is not")
        if rank == 0:
            for note in notes:
                print(f"note: resuming with {note}; the run continues, not bitwise as it would have",
                      file=sys.stderr)
    elif resume and rank == 0:
        print(f"no checkpoint at {ckpt_path}; starting a new run", file=sys.stderr)
    _batches_per_epoch(cfg, data, world)
    if step == 0:
        _initialise(cfg, data, model, device, rank, world)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "noise": noise, "history": history,
            "step": step}


def _initialise(cfg: TrainConfig, data: ImageData, model: CInCFlow, device: torch.device, rank: int,
                world: int) -> None:
    """ActNorm's data-dependent initialisation on the first batch, before DDP wraps the model (DDP then broadcasts
    rank 0's statistics to every rank), with its own noise generator so that the training noise stream stays
    untouched. A model whose log-likelihood is not finite there would only ever skip its steps: refused."""
    first = next(_batches(cfg, data, device, rank, world, 0)).to(device)
    init_noise = torch.Generator(device=device).manual_seed(cfg.seed)
    with torch.no_grad():
        log_prob = model.train()(dequantize(first, data.num_levels, init_noise))
    (bad,) = all_reduce_sum([float(not bool(torch.isfinite(log_prob).all()))], device)
    if bad:
        raise ValueError(f"the new model's log-likelihood of the first batch is not finite, so no step could train "
                         f"it; check the model settings (conv {cfg.conv!r}, conv_kwargs {cfg.conv_kwargs}, preset "
                         f"{cfg.preset!r})")


def _batches_per_epoch(cfg: TrainConfig, data: ImageData, world: int) -> int:
    count = len(data.train) // (cfg.batch_size * world)
    if count < 1:
        raise ValueError(f"batch_size {cfg.batch_size} × {world} processes exceeds the {len(data.train)} "
                         f"training images")
    return count


def _batches(cfg: TrainConfig, data: ImageData, device: torch.device, rank: int, world: int,
             start: int) -> Iterator[torch.Tensor]:
    """This rank's training batches (uint8 levels) from step ``start`` on, epoch after epoch."""
    epoch, offset = divmod(start, _batches_per_epoch(cfg, data, world))
    while True:
        lists = _epoch_batches(data.train, cfg.batch_size, epoch, cfg.seed, rank, world)[offset:]
        loader = DataLoader(data.train, batch_sampler=lists, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda")
        for levels, _ in loader:
            yield levels
        epoch, offset = epoch + 1, 0


def _run(cfg: TrainConfig, data: ImageData, device: torch.device, rank: int, world: int, state: dict[str, Any],
         out_dir: str, ckpt_path: str, progress: bool, signals: _StopSignals, writer: Any) -> dict[str, Any]:
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    noise, history, step = state["noise"], state["history"], state["step"]
    n_bits = data.n_bits
    dims = math.prod(data.shape)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    net.train()
    sample_generator_seed = cfg.seed + 12345

    def write_outputs() -> None:
        """Checkpoint, metrics, plot (rank 0 writes; every rank contributes its RNG state)."""
        states = {"world_size": world, "noise": gather(noise.get_state().cpu()),
                  "torch": gather(torch.get_rng_state())}
        if rank == 0:
            save_checkpoint({
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
            atomic_write_text(json.dumps(history) + "\n", os.path.join(out_dir, "metrics.json"))
            _plot_history(history, os.path.join(out_dir, "loss.png"),
                          f"{cfg.name}: {cfg.conv} + {cfg.coupling} on {cfg.data}")
        barrier()

    def write_samples() -> None:
        if rank == 0:
            model.eval()
            for t in cfg.temperatures:
                g = torch.Generator(device=device).manual_seed(sample_generator_seed)
                path = os.path.join(out_dir, "samples", f"step_{step:06d}_T{t:.2f}.png")
                batches = sample_batches(model, cfg.n_samples, t, g)
                if writer is None:
                    write_grid(batches, cfg.n_samples, path, scale=state["sample_scale"])
                else:  # TensorBoard takes the grid whole
                    images = torch.cat(list(batches))
                    write_grid([images], cfg.n_samples, path, scale=state["sample_scale"])
                    writer.add_image(f"samples/T{t:.2f}", grid_tensor(images, None, 1, 1), step)
            model.train()
        barrier()

    bar = None
    if progress and rank == 0:
        tqdm = optional_import("tqdm", "flow", "the progress bar").tqdm

        # disable=None: a bar only where a terminal shows it, not in log files and CI output.
        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, unit="step", dynamic_ncols=True, disable=None)
    stream = _batches(cfg, data, device, rank, world, step)
    smoothed_bpd: Optional[float] = None
    smoothed_rate: Optional[float] = None
    skipped = 0
    while step < cfg.steps:
        tic = time.perf_counter()
        levels = next(stream).to(device, non_blocking=True)
        if cfg.flip:
            levels = random_horizontal_flip(levels, noise)
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
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        # The stop request rides on the loss's all-reduce: every rank stops after the same step.
        loss_sum, stop = all_reduce_sum([float(loss.detach()), float(signals.signum != 0)], device)
        mean_bpd = loss_sum / world
        rate = cfg.batch_size * world / max(time.perf_counter() - tic, 1e-9)
        history["train_step"].append(step)
        history["train_bpd"].append(mean_bpd)
        history["images_per_s"].append(rate)
        if writer is not None:
            writer.add_scalar("train/bits_per_dim", mean_bpd, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/images_per_s", rate, step)
        if math.isfinite(mean_bpd):
            smoothed_bpd = mean_bpd if smoothed_bpd is None else 0.95 * smoothed_bpd + 0.05 * mean_bpd
        smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
        if bar is not None:
            postfix: dict[str, object] = {"bpd": f"{smoothed_bpd:.3f}" if smoothed_bpd is not None else "nan",
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
            if writer is not None:
                writer.add_scalar("test/bits_per_dim", history["test_bpd"][-1], step)
        if step % cfg.sample_every == 0 or last:
            write_samples()
        if step % cfg.checkpoint_every == 0 or last or stop:
            write_outputs()
        if stop and not last:
            if bar is not None:
                bar.close()
            raise RunInterrupted(step, ckpt_path, signals.signum or signal.SIGINT)
    if bar is not None:
        bar.close()
    if not history["test_bpd"]:  # resumed a finished run
        history["test_step"].append(step)
        history["test_bpd"].append(evaluate(model, data.test, data.num_levels, device=device, seed=cfg.seed))
    return {"history": history, "test_bpd": history["test_bpd"][-1], "out_dir": out_dir, "step": step,
            "skipped_steps": skipped, "model": model}

