"""Device, backend, precision and data placement helpers shared by train / eval / embed."""
import contextlib
import logging
import platform
from typing import Dict, Tuple

import numpy as np
import torch
from torch import Tensor

import dnnrl_ext

from .data import Dataset, load_dataset
from .synthetic import make_synthetic
from .transforms import AugmentConfig, evaluate_transform, tta_shifts

log = logging.getLogger("dnnrl")
_warned_backend = False


def pick_device(name: str = "auto") -> torch.device:
    """The torch device a run uses: ``"auto"`` is CUDA when available, else the CPU.

    A name torch cannot parse, or a CUDA device this machine does not have, raises a
    ValueError that names ``device`` (torch's own errors come from deep inside the
    first CUDA call)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got %r" % (name,)) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError("device %r: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                             "False); use --device cpu or auto" % (name,))
        if dev.index is not None and dev.index >= count:
            raise ValueError("device %r: this machine has %d CUDA GPU(s), cuda:0 to cuda:%d"
                             % (name, count, count - 1))
    return dev


def resolve_backend(requested: str, device: torch.device) -> str:
    """The dnnrl_ext backend to use: the compiled kernels when they can run on `device`
    (loaded; for a CUDA device built with CUDA kernels, on an Ampere or newer card), else
    "reference" with one logged warning."""
    global _warned_backend
    if requested == "reference":
        return "reference"
    from dnnrl_ext import _extension
    ok = dnnrl_ext.extension_available() and (device.type != "cuda" or dnnrl_ext.has_cuda_kernels())
    reason = None if not ok else _extension._unavailable_reason(device)
    if ok and reason is None:
        return "auto"
    if requested == "compiled":
        raise dnnrl_ext.ExtensionNotAvailable("backend='compiled' requested but the kernels cannot "
                                              "run on %s%s" % (device, " (%s)" % reason if reason else ""))
    if not _warned_backend:
        log.warning("dnnrl_ext compiled kernels unavailable on %s (%s); using the pure-PyTorch "
                    "reference backend (slower)", device, reason or _extension._LOAD_ERROR or "no CUDA kernels")
        _warned_backend = True
    return "reference"


def amp_enabled(mode: str, device: torch.device) -> bool:
    """Whether `mode` ("auto", "bf16", ...) means bf16 autocast on `device`."""
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def amp_context(mode: str, device: torch.device):
    """bf16 autocast on CUDA ("auto"), or as requested; a null context otherwise."""
    if amp_enabled(mode, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """What ran the work, for the records: the card's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (%s, %d threads)" % (platform.processor() or platform.machine(), torch.get_num_threads())


def use_channels_last(mode, device: torch.device) -> bool:
    """Whether the network and its inputs use the channels_last memory format ("auto": on
    CUDA and on the CPU). On the 2-core dev CPU (oneDNN) channels_last trains the Table 1
    network 1.4x faster and embeds 1.7x faster than NCHW (there its 3x3/2 ceil-mode max
    pools alone took a quarter of the forward), and the CPU preset trains 1.2-1.7x faster."""
    if isinstance(mode, bool):
        return mode
    return mode == "on" or (mode == "auto" and device.type in ("cuda", "cpu"))


def use_cudnn_benchmark(mode: str, device: torch.device) -> bool:
    """Whether cuDNN should time its convolution algorithms ("auto": on CUDA, where a run
    feeds the network one fixed input shape)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def load_data(cfg, need_val: bool = False) -> Dataset:
    """The configured data set (synthetic without ``cfg.data``), subsets applied.

    ``need_val`` (training, evaluating a checkpoint): a data set without a validation
    split gets one carved from its training split (:func:`carve_validation`), since the
    protocol and the choice of k steer by it; the same images every time."""
    if cfg.data:
        ds = load_dataset(cfg.data, skip_bad=cfg.skip_bad, cache_dir=cfg.cache_dir)
    else:
        ds = make_synthetic(cfg.synthetic_train_per_class, cfg.synthetic_val_per_class,
                            cfg.synthetic_test_per_class, seed=cfg.seed)
    if need_val:
        carve_validation(ds)
    rng = np.random.default_rng(cfg.seed + 1)
    for split, n in (("train", cfg.train_subset), ("val", cfg.val_subset)):
        if n and split in ds.splits and n < len(ds.splits[split][1]):
            x, y = ds.splits[split]
            idx = np.sort(_stratified(y, n, rng))
            ds.splits[split] = (x[idx], y[idx])
    return ds


# A data set with train (and perhaps test) but no val, e.g. a train/ + test/ folder pair: the
# share of its training images that become validation, as in the 80/10/10 split of a flat folder.
VAL_FRACTION = 0.1


def carve_validation(ds: Dataset) -> int:
    """Move VAL_FRACTION of each class's training images (classes with at least two) into a
    new "val" split when ``ds`` has none; returns how many moved (0 when it has one).

    The draw uses a fixed seed, not the run's, so runs with different seeds are scored
    on the same images. Raises ValueError when no class has two training images."""
    if len(ds.splits.get("val", ((), ()))[1]) > 0 or "train" not in ds.splits:
        return 0
    x, y = ds.splits["train"]
    rng = np.random.default_rng(0)
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if members.size >= 2:
            take = min(members.size - 1, max(1, int(round(VAL_FRACTION * members.size))))
            val.append(rng.permutation(members)[:take])
    if not val:
        raise ValueError("the data has no validation split, and no class has two training images to carve "
                         "one from (split sizes: %s)" % {s: len(v[1]) for s, v in ds.splits.items()})
    is_val = np.zeros(len(y), dtype=bool)
    is_val[np.concatenate(val)] = True
    ds.splits["val"] = (x[is_val], y[is_val])
    ds.splits["train"] = (x[~is_val], y[~is_val])
    log.warning("the data has no validation split: %d of its training images (%.0f %%, stratified, the same "
                "for every seed) are the validation split here", int(is_val.sum()), 100 * VAL_FRACTION)
    return int(is_val.sum())


def _stratified(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices keeping the class proportions of y: exactly n (the largest remainders
    round up; rounding each class alone gave 349 for --val-subset 350), but at least one
    per class, so more than n when n is below the number of classes."""
    classes, counts = np.unique(y, return_counts=True)
    quota = n * counts / y.size
    floor = np.floor(quota).astype(np.int64)
    take = np.maximum(floor, 1)
    short = n - int(take.sum())
    if short > 0:  # round up the largest remainders, of the classes not already raised to one
        # (quota < count for every class, as n < y.size, so floor + 1 never exceeds it)
        remainder = np.where(floor == 0, -1.0, quota - floor)
        take[np.argsort(-remainder, kind="stable")[:short]] += 1
    out = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)]
    return np.concatenate(out)


def place_data(ds: Dataset, device: torch.device) -> Tuple[Dict[str, Tuple[Tensor, Tensor]], torch.device]:
    """uint8 images and labels as tensors on the training device when they fit (always
    on CPU); returns ({split: (x (N, S, S) uint8, y (N,) int64)}, where the images are)."""
    total = sum(x.nbytes for x, _ in ds.splits.values())
    where = device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if total > 0.3 * free:
            log.warning("data (%.1f GB) does not fit comfortably on %s; keeping it in pinned host memory",
                        total / 1e9, device)
            where = torch.device("cpu")
    out = {}
    for s, (x, y) in ds.splits.items():
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        if where.type == "cpu" and device.type == "cuda":
            xt = xt.pin_memory()
        out[s] = (xt.to(where), yt.to(device))
    return out, where


@torch.no_grad()
def embed(model, images: Tensor, aug: AugmentConfig, device: torch.device, amp: str = "auto",
          channels_last: bool = False, batch_size: int = 512, head: bool = False) -> Tensor:
    """Embeddings (N, D) float32 (or head logits (N, C) with ``head``) of uint8 images
    (N, S, S) under the deterministic evaluation transform, on ``device``. With
    ``aug.tta_flip`` each image and its mirror image are both embedded, with
    ``aug.tta_shift`` also four shifted copies (10 views with both): the embeddings are
    summed and re-normalised, the logits averaged."""
    was_training = model.training
    model.eval()
    outs = []
    for s in range(0, images.shape[0], batch_size):
        xb = images[s:s + batch_size].to(device, non_blocking=True)
        views = []
        for shift in tta_shifts(aug):
            x = evaluate_transform(xb, aug, shift=shift)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            views += [x, torch.flip(x, dims=[-1])] if aug.tta_flip else [x]
        with amp_context(amp, device):
            out = [(model.logits(v) if head else model(v)).float() for v in views]
        if len(out) == 1:
            out = out[0]
        elif head:
            out = torch.stack(out).mean(0)
        else:
            out = torch.nn.functional.normalize(torch.stack(out).sum(0), dim=1)
        outs.append(out)
    model.train(was_training)
    if not outs:
        return torch.zeros(0, model.num_classes if head else model.embed_dim, device=device)
    return torch.cat(outs)


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
