"""The training driver: one loop for DNNRL (exp triplet + k-NN), T-DNN (hinge triplet
+ k-NN) and DNN (softmax), with the paper's protocol (SPEC section 6).

Per epoch: floor(N / B) batches of on-device augmentation + SGD; then the validation
loss. A new lowest validation loss is the new best (weights kept); a loss more than
``rise_threshold`` (10 %) above the best divides the lr by 10 (floor ``lr_min``) and
reloads the best weights (with fresh momentum); ``patience`` epochs without a new
best stop the run. Options beyond the paper: ``schedule="cosine"`` (lr from lr to
lr_min along a cosine, no reloads), ``schedule="late_cosine"`` (the paper's protocol,
then a cosine to lr_min over the last ``anneal_fraction`` of the run) and
``time_budget`` (no epoch starts that would end past that many seconds of training;
the run is then evaluated as usual, so a run sized for a fixed machine time still ends
with its results). Every epoch is checkpointed (model, optimizer, lr, epoch, RNG
states, best) so ``resume=True`` continues exactly where the run stopped, and logged
as one JSON line in log.jsonl. Finally the best weights are evaluated (k-NN gallery =
training set, k chosen on validation) into results.json.

GPU path: uint8 data, sampling and augmentation all on the device; bf16 autocast and
channels_last; the loss is accumulated on the device and read back only every
``log_every`` steps for a progress bar (never with progress off), and a step makes no
other host sync, so the host queues the next step while the card runs this one.
"""
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dnnrl_ext import ExpTripletLoss, TripletLoss, TripletLossOutput, triplet_loss_from_triplets

from . import distributed
from .config import SELECT_BY, SELECT_BY_NAMES, Config, validate
from .evaluate import evaluate_model, write_results
from .model import DNNRLNet, fold_batch_norm
from .graphs import GraphedForward
from .runtime import (amp_context, amp_enabled, embed, load_data, place_data, resolve_backend, device_name,
                      seed_everything, use_channels_last, use_cudnn_benchmark)
from .samplers import make_sampler
from .transforms import AugmentConfig, augment, evaluate_transform
from dnnrl_ext.knn import accuracy_per_k
from dnnrl_ext import knn

log = logging.getLogger("dnnrl")


def setup_logging(run_dir: Optional[str] = None, level=logging.INFO) -> None:
    root = logging.getLogger("dnnrl")
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_dnnrl", False):
            root.removeHandler(h)
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "run.log")))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        h._dnnrl = True
        root.addHandler(h)
    root.propagate = False


def _random_pn(y: Tensor, generator: Optional[torch.Generator] = None):
    """Per anchor of the batch a uniformly random positive (another member of its class)
    and negative (a member of another class): pos, neg, keep, each (B,); where keep is
    False (no positive or no negative) pos = neg = the anchor itself. No host sync."""
    B = y.shape[0]
    same = y[:, None] == y[None, :]
    eye = torch.eye(B, dtype=torch.bool, device=y.device)
    pos_mask, neg_mask = same & ~eye, ~same
    u = torch.rand((2, B, B), generator=generator, device=y.device)
    # uniform choice = argmax of uniform scores over the allowed entries
    pos = torch.where(pos_mask, u[0], -1.0).argmax(1)
    neg = torch.where(neg_mask, u[1], -1.0).argmax(1)
    keep = pos_mask.any(1) & neg_mask.any(1)
    anchor = torch.arange(B, device=y.device)
    return torch.where(keep, pos, anchor), torch.where(keep, neg, anchor), keep


def random_triplets(y: Tensor, generator: Optional[torch.Generator] = None):
    """One random triplet per anchor of a batch (the paper's randomly sampled triplets).

    Args:
        y: (B,) int64 labels.
    Returns:
        anchor, positive, negative: (T,) int64 indices into the batch, T <= B (anchors
        without a positive or a negative in the batch are dropped); the positive is a
        uniformly random other member of the anchor's class, the negative a uniformly
        random member of another class.
    """
    if y.shape[0] == 0:
        return (y.new_zeros(0, dtype=torch.long),) * 3
    pos, neg, keep = _random_pn(y, generator)
    anchor = torch.arange(y.shape[0], device=y.device)
    return anchor[keep], pos[keep], neg[keep]


def _easy_positive_pn(embeddings: Tensor, y: Tensor):
    """Nearest positive and nearest negative per anchor: pos, neg, keep (B,) as in
    :func:`_random_pn` (ties to the smaller index). No host sync."""
    B = y.shape[0]
    with torch.no_grad():
        e = embeddings.detach().float()
        sq = (e * e).sum(1)
        d = (sq[:, None] - 2.0 * e @ e.T + sq[None, :]).clamp(min=0)  # (B, B): B is a batch
        same = y[:, None] == y[None, :]
        eye = torch.eye(B, dtype=torch.bool, device=y.device)
        pos_mask, neg_mask = same & ~eye, ~same
        # masked_fill with a Python float: torch.tensor(inf, device=...) would be a blocking
        # host-to-device copy, i.e. a stream sync in every training step
        pos = d.masked_fill(~pos_mask, float("inf")).argmin(1)
        neg = d.masked_fill(~neg_mask, float("inf")).argmin(1)
        keep = pos_mask.any(1) & neg_mask.any(1)
        anchor = torch.arange(B, device=y.device)
        return torch.where(keep, pos, anchor), torch.where(keep, neg, anchor), keep


def easy_positive_triplets(embeddings: Tensor, y: Tensor):
    """Per anchor the *nearest* positive and the nearest negative of the batch
    ("easy positive, hard negative", Xuan et al., WACV 2020).

    Why: batch-hard and semi-hard both take the farthest positive. Where classes
    overlap (FER-2013), that positive is an outlier far across the embedding, and the
    loss then reshapes the far field while the anchor's neighbourhood, which the
    k-NN vote reads, is left alone (docs/app.md). The nearest pair asks the anchor's
    nearest same-class image to be nearer than its nearest other-class image.

    Args:
        embeddings: (B, D); y: (B,) int64 labels.
    Returns:
        anchor, positive, negative: (T,) int64, T <= B (anchors without a positive or a
        negative are dropped); ties go to the smaller index.
    """
    if y.shape[0] == 0:
        return (y.new_zeros(0, dtype=torch.long),) * 3
    pos, neg, keep = _easy_positive_pn(embeddings, y)
    anchor = torch.arange(y.shape[0], device=y.device)
    return anchor[keep], pos[keep], neg[keep]


class ExplicitTripletLoss(torch.nn.Module):
    """Exp (or hinge) triplet loss on one triplet per anchor formed in Python
    (``mining="random_triplets"``: random positive and negative, the paper's literal
    sampling; ``"easy_positive"``: nearest positive and nearest negative), through
    ``dnnrl_ext.triplet_loss_from_triplets``; returns the same
    :class:`TripletLossOutput` as the mined losses (r and valid per anchor)."""

    def __init__(self, loss: str, alpha: float, gamma: float, margin: float, reduction: str,
                 backend: str, generator: Optional[torch.Generator] = None, mining: str = "random_triplets"):
        super().__init__()
        if mining not in ("random_triplets", "easy_positive"):
            raise ValueError("mining must be 'random_triplets' or 'easy_positive', got %r" % (mining,))
        self.kw = dict(loss=loss, alpha=alpha, gamma=gamma, margin=margin, reduction=reduction,
                       backend=backend)
        self.generator = generator
        self.mining = mining

    def forward(self, embeddings: Tensor, labels: Tensor, return_details: bool = False):
        B = labels.shape[0]
        if self.mining == "random_triplets":
            p, n, keep = _random_pn(labels, self.generator)
        else:
            p, n, keep = _easy_positive_pn(embeddings, labels)
        # Every anchor keeps a slot (a triplet without a positive or negative is (a, a, a):
        # r = 0, zero gradient) and is masked out of the reduction here, so the step has
        # no data-dependent shape and no host sync (boolean indexing would read back).
        kw = dict(self.kw, reduction="none")
        a = torch.arange(B, device=labels.device)
        per, r = triplet_loss_from_triplets(embeddings, a, p, n, return_r=True, validate=False, **kw)
        zero = per.new_zeros(())
        per = torch.where(keep, per, zero)  # (where, not a product: a NaN row stays out)
        red = self.kw["reduction"]
        if red == "none":
            loss = per
        else:
            loss = per.sum()
            if red == "mean":
                loss = loss / keep.sum().clamp(min=1).to(per.dtype)
        if not return_details:
            return loss
        minus1 = torch.full_like(p, -1)
        return TripletLossOutput(loss, torch.where(keep, p, minus1), torch.where(keep, n, minus1),
                                 torch.where(keep, r, zero), keep)


def easy_positive_in_python() -> bool:
    """Whether the recipe's easy-positive triplets are formed in Python (:class:`ExplicitTripletLoss`)
    instead of mined inside the fused op, which is the default: one or two launches and no
    B x B buffer instead of a dozen ops. ``DNNRL_EASY_POSITIVE_IN_PYTHON=1`` asks for the
    Python form (same triplets, loss and gradient: tests/test_app_train.py); a GPU session sets
    it where the op's CUDA form fails its smoke check (benchmarks/smoke_cuda.py)."""
    value = os.environ.get("DNNRL_EASY_POSITIVE_IN_PYTHON", "0")
    if value not in ("", "0", "1"):
        raise ValueError("DNNRL_EASY_POSITIVE_IN_PYTHON must be 0 or 1, got %r" % (value,))
    return value == "1"


def explicit_minings() -> tuple:
    """The minings whose triplets the app forms in Python, not the op."""
    return ("random_triplets", "easy_positive") if easy_positive_in_python() else ("random_triplets",)


def make_criterion(cfg: Config, backend: str, reduction: Optional[str] = None,
                   generator: Optional[torch.Generator] = None):
    """The training loss module (``reduction`` overrides cfg.reduction, e.g. "mean" for
    the validation loss, which is reported per anchor). ``generator`` draws the
    triplets of ``mining="random_triplets"``."""
    red = reduction or cfg.reduction
    if cfg.method in ("dnnrl", "tdnn") and cfg.mining in explicit_minings():
        return ExplicitTripletLoss("exp" if cfg.method == "dnnrl" else "hinge", cfg.alpha, cfg.gamma,
                                   cfg.margin, red, backend, generator, mining=cfg.mining)
    if cfg.method == "dnnrl":
        return ExpTripletLoss(alpha=cfg.alpha, gamma=cfg.gamma, mining=cfg.mining, reduction=red,
                              backend=backend)
    if cfg.method == "tdnn":
        return TripletLoss(margin=cfg.margin, mining=cfg.mining, reduction=red, backend=backend)
    return torch.nn.CrossEntropyLoss()


# --tta crops: the face moved by this many pixels (108-px scale) along both diagonals,
# two thirds of the training crop's +-6 px range.
TTA_CROP_SHIFT = 4.0


def augment_config(cfg: Config) -> AugmentConfig:
    return AugmentConfig(out_size=cfg.image_size, flip=cfg.flip, tta_flip=cfg.tta in ("flip", "crops"),
                         tta_shift=TTA_CROP_SHIFT if cfg.tta == "crops" else 0.0, erase_prob=cfg.erase)


def build(cfg: Config, num_classes: int, device: torch.device) -> DNNRLNet:
    model = DNNRLNet(num_classes=num_classes, width=cfg.width, embed_dim=cfg.embed_dim,
                     dropout=cfg.dropout).to(device)
    if use_channels_last(cfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def save_model(path: str, model, cfg: Config, class_names, extra: Optional[dict] = None) -> None:
    state = {"config": cfg.to_dict(), "class_names": list(class_names),
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    state.update(extra or {})
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_run_file(path: str, map_location="cpu", need=("config", "class_names", "model")) -> dict:
    """The dict that save_model / Trainer.save_checkpoint wrote to ``path``.

    Raises FileNotFoundError when the file is absent and ValueError naming the file when it
    is not such a dict (another torch file, a truncated or foreign file): torch.load itself
    raises pickle, zip, EOF or runtime errors for those, which would reach the user as a
    traceback."""
    if not os.path.isfile(path):
        raise FileNotFoundError("%s does not exist" % path)
    try:
        st = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 (whatever torch.load raises, the answer is the same)
        raise ValueError("%s is not a dnnrl checkpoint (%s: %s)" % (path, type(exc).__name__, exc)) from None
    missing = [k for k in need if not (isinstance(st, dict) and k in st)]
    if missing:
        raise ValueError("%s is not a dnnrl checkpoint (no %s in it)" % (path, " / ".join(missing)))
    return st


class Trainer:
    """Holds the run's state; ``fit()`` runs the protocol, ``evaluate()`` the final test."""

    def __init__(self, cfg: Config, resume: bool = False):
        t_setup = time.time()
        self.cfg = cfg
        self.run_dir = cfg.out
        os.makedirs(self.run_dir, exist_ok=True)
        self.ckpt_path = os.path.join(self.run_dir, "checkpoint.pt")
        if cfg.init_from and not resume and not os.path.exists(cfg.init_from):  # before loading data
            raise FileNotFoundError("--init-from: %s does not exist" % cfg.init_from)
        self.dist = distributed.setup(cfg.device)  # single process unless run by torchrun
        self.device = self.dist.device
        self.backend = resolve_backend(cfg.backend, self.device)
        seed_everything(cfg.seed)
        t0 = time.time()
        ds = load_data(cfg, need_val=True)
        self.class_names = ds.class_names
        self.data_summary = ds.summary()
        if ds.skipped:
            log.warning("skipped %d bad data items (--skip-bad); first: %s", len(ds.skipped), ds.skipped[0])
        if "train" not in ds.splits:
            raise ValueError("the data has no training split")
        self.data, self.data_device = place_data(ds, self.device)
        log.info("data %s: %s in %.1f s on %s", self.data_summary["source"], self.data_summary["sizes"],
                 time.time() - t0, self.data_device)
        self.aug = augment_config(cfg)
        self.channels_last = use_channels_last(cfg.channels_last, self.device)
        torch.backends.cudnn.benchmark = use_cudnn_benchmark(cfg.cudnn_benchmark, self.device)
        self.model = build(cfg, len(self.class_names), self.device)
        self._joint = cfg.method != "dnn" and cfg.softmax_weight > 0  # triplet + softmax head
        if cfg.init_from and not resume:  # (a resumed run restores its own weights)
            self._init_weights(cfg.init_from)
        self.fwd_model = distributed.wrap_model(self.model, self.dist, uses_head=cfg.method == "dnn" or self._joint,
                                                compile=cfg.compile, compile_mode=cfg.compile_mode)
        self._graph = None  # --cuda-graph on: the training fwd + bwd replayed (dnnrl.graphs)
        if cfg.cuda_graph == "on":
            if self.device.type != "cuda":
                raise ValueError("cuda_graph 'on' needs a CUDA device; this run is on %s" % self.device)
            if self.dist.enabled:
                raise ValueError("cuda_graph 'on' runs in one process; under torchrun (DDP) leave it off")
            self._graph = GraphedForward(self.model, cfg.method, self._joint, amp_enabled(cfg.amp, self.device))
        # random_triplets draws its triplets from these (the validation one is re-seeded
        # every validation so the val loss compares the same triplets epoch to epoch)
        self.triplet_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 11)
        self.val_triplet_gen = torch.Generator(device=self.device)
        self.criterion = make_criterion(cfg, self.backend, generator=self.triplet_gen)
        # recorded in results.json: DNNRL_EASY_POSITIVE_IN_PYTHON moves the recipe's mining
        self.triplets_formed_by = (None if cfg.method == "dnn" else
                                   "python" if isinstance(self.criterion, ExplicitTripletLoss) else "op")
        self.val_criterion = make_criterion(cfg, self.backend, reduction="mean",
                                            generator=self.val_triplet_gen)
        self.optimizer = self._optimizer(cfg.lr)
        ytr = self.data["train"][1]
        sampler = make_sampler(cfg.sampler, ytr.cpu(), cfg.batch_size, device=self.device)
        if len(sampler) == 0:
            raise ValueError("the training split has %d image(s): too few for one batch" % ytr.numel())
        if ytr.numel() < cfg.batch_size:
            log.warning("the training split has %d images, fewer than one batch of %d (--batch-size): "
                        "batches of %d", ytr.numel(), cfg.batch_size, sampler.batch_size)
        self.sampler = distributed.shard_sampler(sampler, self.dist)
        if self.dist.enabled and cfg.method != "dnn":  # mining over the global batch (or per rank)
            self.criterion = distributed.DistributedLoss(self.criterion, cfg.mining_scope, cfg.reduction,
                                                         global_batch=self.sampler.batch_size)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed)             # batches (CPU)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7)  # augmentation
        self.epoch, self.lr = 0, cfg.lr
        self.best_val, self.best_epoch, self.since_best = math.inf, 0, 0
        self.best_state = None
        self.anneal_start_lr = None  # late_cosine: the lr its final cosine starts from
        self.history = []
        self._val_batches = self._fixed_val_batches()
        if not self._val_batches:
            log.warning("the validation split has %d image(s): the validation loss needs 2 and is NaN, so "
                        "only --select-by val_knn / val_accuracy can steer this run",
                        len(self.data.get("val", ((), ()))[1]))
        self._monitor_idx = self._monitor_subset()
        if resume:
            self._load_checkpoint()
        elif self.dist.is_main:  # a fresh run in an old run directory must not append to the old log
            open(os.path.join(self.run_dir, "log.jsonl"), "w").close()
        self.setup_seconds = time.time() - t_setup  # data loading and placement, model, resume

    # ------------------------------------------------------------------ setup helpers
    def _init_weights(self, path: str) -> None:
        """Load another run's (best) weights; the network must have the same shape."""
        from .cli import _load_checkpoint
        src, src_cfg, src_classes, state = _load_checkpoint(path)
        if list(src_classes) != list(self.class_names):
            log.warning("--init-from: %s was trained on classes %s, this data has %s",
                        src, list(src_classes), list(self.class_names))
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError("--init-from: %s holds a network of another shape (width %g, embed_dim %d, "
                             "%d classes; this run: width %g, embed_dim %d, %d classes): %s"
                             % (src, src_cfg.width, src_cfg.embed_dim, len(src_classes), self.cfg.width,
                                self.cfg.embed_dim, len(self.class_names), str(exc).splitlines()[0])) from None
        log.info("initialised from %s (a %s run)", src, src_cfg.method)

    def _optimizer(self, lr: float):
        # fused on CUDA: the whole update in one kernel instead of several multi-tensor
        # launches per step (at batch 128 the step is bound by the host's launches; same
        # arithmetic to rounding). Elsewhere torch's default.
        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay,
                               fused=True if self.device.type == "cuda" else None)

    def _fixed_val_batches(self):
        if "val" not in self.data:
            return []
        n = self.data["val"][1].shape[0]
        g = torch.Generator().manual_seed(self.cfg.seed + 3)
        perm = torch.randperm(n, generator=g)
        B = self.cfg.batch_size
        return [perm[i:i + B].to(self.device) for i in range(0, n, B) if n - i >= 2]

    def _monitor_subset(self):
        n = self.data["train"][1].shape[0]
        m = min(self.cfg.monitor_gallery, n)
        if m <= 0 or self.cfg.method == "dnn" or "val" not in self.data:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed + 5)
        return torch.randperm(n, generator=g)[:m]

    def _amp(self):
        return amp_context(self.cfg.amp, self.device)

    def _prep(self, xb):
        if self.channels_last:
            return xb.contiguous(memory_format=torch.channels_last)
        return xb

    def _cross_entropy(self, logits, y):
        """Cross-entropy of the softmax head: logits (B, C) float32, y (B,) -> (); with
        --label-smoothing in training only (the validation loss stays comparable across runs)."""
        smoothing = self.cfg.label_smoothing if self.model.training else 0.0
        return F.cross_entropy(logits, y, label_smoothing=smoothing)

    # ------------------------------------------------------------------ one epoch
    def _loss(self, x, y, criterion=None):
        """Loss of one batch of images x (B, 1, S, S) and labels y; (loss, active fraction or None)."""
        if self._graph is not None and self.model.training:
            outs = self._graph(x)  # (logits,) / (emb, logits) / (emb,), float32
            if self.cfg.method == "dnn":
                return self._cross_entropy(outs[0], y), None
            emb, logits = outs[0], (outs[1] if self._joint else None)
        else:
            with self._amp():
                if self.cfg.method == "dnn":
                    logits = (self.fwd_model.logits(x) if not self.cfg.compile or self.dist.enabled
                              else self.model.logits(x))
                    return self._cross_entropy(logits.float(), y), None
                if self._joint:
                    emb, logits = self.fwd_model.embed_and_logits(x)
                else:
                    emb = self.fwd_model(x)
        out = (criterion or self.criterion)(emb.float(), y, return_details=True)
        gamma = self.cfg.gamma
        # "active": triplets with a non-zero gradient (exp: r > gamma; hinge: r < margin)
        if self.cfg.method == "dnnrl":
            act = ((out.r > gamma) & out.valid).float().sum() / out.valid.float().sum().clamp(min=1)
        else:
            act = ((out.r < self.cfg.margin) & out.valid).float().sum() / out.valid.float().sum().clamp(min=1)
        if self._joint:
            return out.loss + self.cfg.softmax_weight * self._cross_entropy(logits.float(), y), act
        return out.loss, act

    def train_step(self, idx: Tensor):
        """One optimisation step on the training images ``idx`` ((B,) int64 row indices
        of the training split): augmentation, forward, loss, backward, SGD step.

        Returns (loss, active fraction or None), detached 0-d tensors on the device. Makes
        no host sync on a CUDA device after the first steps (cuDNN's algorithm search, a
        --cuda-graph capture), so the host queues the next step while the card runs this
        one (a GPU test checks it under ``torch.cuda.set_sync_debug_mode("error")``).
        """
        x_all, y_all = self.data["train"]
        xb = x_all[idx.to(x_all.device)].to(self.device, non_blocking=True)
        yb = y_all[idx]
        x = self._prep(augment(xb, self.aug, self.aug_gen))
        loss, act = self._loss(x, yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (act.detach() if act is not None else None)

    def train_epoch(self) -> Dict[str, float]:
        from tqdm.auto import tqdm
        cfg, model = self.cfg, self.model
        model.train()
        distributed.reseed_epoch(self.aug_gen, cfg.seed, self.epoch, self.dist)
        n_batches = len(self.sampler)
        if cfg.epoch_batches:
            n_batches = min(n_batches, cfg.epoch_batches)
        loss_sum = torch.zeros((), device=self.device)
        act_sum = torch.zeros((), device=self.device)
        t0 = time.time()
        bar = tqdm(total=n_batches, desc="epoch %d" % (self.epoch + 1), leave=False, mininterval=1.0,
                   disable=not cfg.progress or not self.dist.is_main, dynamic_ncols=True)
        seen = 0
        for step, idx in enumerate(self.sampler.epoch(self.sample_gen)):
            if step >= n_batches:
                break
            loss, act = self.train_step(idx)
            loss_sum += loss
            if act is not None:
                act_sum += act
            seen += idx.numel()
            bar.update(1)
            # the only host sync inside the epoch, and only for a progress bar that shows it
            if not bar.disable and (step + 1) % cfg.log_every == 0:
                bar.set_postfix(loss="%.4f" % (loss_sum.item() / (step + 1)))
        bar.close()
        steps = max(1, min(n_batches, step + 1 if n_batches else 0))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        distributed.sync_buffers(self.model, self.dist)
        dt = time.time() - t0
        seen *= self.dist.world_size  # images/s of all ranks together
        out = {"train_loss": loss_sum.item() / steps, "train_seconds": dt,
               "images_per_s": seen / dt if dt > 0 else 0.0, "steps": steps}
        if self.cfg.method != "dnn":
            out["train_active_fraction"] = act_sum.item() / steps
        return out

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Validation loss (fixed batches, evaluation transform) and a quick accuracy."""
        self.model.eval()
        if not self._val_batches:
            return {"val_loss": float("nan")}
        x_all, y_all = self.data["val"]
        self.val_triplet_gen.manual_seed(self.cfg.seed + 13)
        count, correct, act_sum = 0, 0, 0.0
        losses = []
        for idx in self._val_batches:
            xb = x_all[idx.to(x_all.device)].to(self.device, non_blocking=True)
            yb = y_all[idx]
            x = self._prep(evaluate_transform(xb, self.aug))
            if self.cfg.method == "dnn":
                with self._amp():
                    logits = self.model.logits(x).float()
                losses.append(F.cross_entropy(logits, yb, reduction="sum"))
                correct += (logits.argmax(1) == yb).sum()
            else:
                loss, act = self._loss(x, yb, self.val_criterion)
                losses.append(loss * idx.numel())
                act_sum += act * idx.numel()
            count += idx.numel()
        out = {"val_loss": float(torch.stack(losses).sum()) / count}
        if self.cfg.method == "dnn":
            out["val_accuracy"] = float(correct) / count
        else:
            out["val_active_fraction"] = float(act_sum) / count
            if self._monitor_idx is not None:
                out["val_knn_accuracy"] = self._monitor_knn()
        self.model.train()
        return out

    def _monitor_knn(self) -> float:
        """Val accuracy of k-NN (best k <= 20) with a fixed subset of training images as the
        gallery: a cheap per-epoch signal of what the embedding has learned. With
        --tta crops it uses the two flip views only (10 views every epoch would cost
        about a fifth of the training throughput on a GPU)."""
        aug = dataclasses.replace(self.aug, tta_shift=0.0)
        kw = dict(aug=aug, device=self.device, amp=self.cfg.amp, channels_last=self.channels_last,
                  batch_size=self.cfg.eval_batch_size)
        xg = self.data["train"][0][self._monitor_idx.to(self.data["train"][0].device)]
        yg = self.data["train"][1][self._monitor_idx.to(self.device)]
        g = embed(self.model, xg, **kw)
        q = embed(self.model, self.data["val"][0], **kw)
        k = min(20, g.shape[0])
        _, nn_idx = knn(q, g, k, backend=self.backend)
        acc = accuracy_per_k(yg[nn_idx], self.data["val"][1], len(self.class_names))
        return float(acc.max())

    # ------------------------------------------------------------------ protocol
    def _state(self) -> dict:
        return {
            "epoch": self.epoch, "lr": self.lr, "best_val": self.best_val, "best_epoch": self.best_epoch,
            "since_best": self.since_best, "history": self.history, "anneal_start_lr": self.anneal_start_lr,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "rng": {"torch": torch.get_rng_state(), "sample": self.sample_gen.get_state(),
                    "aug": self.aug_gen.get_state(), "triplet": self.triplet_gen.get_state(),
                    "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.cfg.to_dict(), "class_names": self.class_names,
        }

    def save_checkpoint(self) -> None:
        tmp = self.ckpt_path + ".tmp"
        torch.save(self._state(), tmp)
        os.replace(tmp, self.ckpt_path)  # never leave a half-written checkpoint

    def _load_checkpoint(self) -> None:
        if not os.path.exists(self.ckpt_path):
            raise FileNotFoundError("--resume: no checkpoint at %s" % self.ckpt_path)
        st = load_run_file(self.ckpt_path, self.device, need=("model", "optimizer", "rng", "history"))
        self.model.load_state_dict(st["model"])
        self.epoch, self.lr = st["epoch"], st["lr"]
        self.optimizer = self._optimizer(self.lr)
        self.optimizer.load_state_dict(st["optimizer"])
        self.best_val, self.best_epoch, self.since_best = st["best_val"], st["best_epoch"], st["since_best"]
        self.best_state, self.history = st["best_state"], st["history"]
        self.anneal_start_lr = st.get("anneal_start_lr")
        rng = st["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        self.sample_gen.set_state(rng["sample"].cpu())
        self.aug_gen.set_state(rng["aug"].cpu() if self.device.type == "cpu" else rng["aug"])
        if rng.get("triplet") is not None:
            self.triplet_gen.set_state(rng["triplet"].cpu() if self.device.type == "cpu" else rng["triplet"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and torch.cuda.is_available() and not self.dist.enabled:
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        # the log is rewritten from the checkpoint's history: no duplicated or lost epochs
        if self.dist.is_main:
            with open(os.path.join(self.run_dir, "log.jsonl"), "w") as fh:
                for rec in self.history:
                    fh.write(json.dumps(rec) + "\n")
        log.info("resumed %s at epoch %d (lr %g, best %s %.4g at epoch %d)", self.ckpt_path, self.epoch,
                 self.lr, SELECT_BY_NAMES[selection_metric(self.cfg)], self.best_val, self.best_epoch)

    def _set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _metric(self, rec: dict) -> float:
        """The number the protocol minimises: the validation loss (the paper); with
        select_by="val_knn" the k-NN validation error of the monitor; with "val_accuracy"
        the error of the accuracy the method is scored by (the softmax head for dnn, the
        k-NN monitor for the others). Where that accuracy is missing, the validation loss."""
        sb = self.cfg.select_by
        if sb not in SELECT_BY:
            raise ValueError("select_by must be one of %s, got %r" % (SELECT_BY, sb))
        key = {"val_knn": "val_knn_accuracy",
               "val_accuracy": "val_accuracy" if self.cfg.method == "dnn" else "val_knn_accuracy"}.get(sb)
        if key is not None and key in rec:
            return 1.0 - rec[key]
        return rec["val_loss"]

    def _spent_seconds(self) -> float:
        """Training wall time so far (every epoch's training + validation, resumes included)."""
        return sum(r.get("epoch_seconds", 0.0) for r in self.history)

    def _next_epoch_seconds(self) -> float:
        """Estimate of one more epoch: the mean of the last three (the first one carries
        the warm-up, so it only counts while it is alone)."""
        timed = self.history[1:] or self.history  # on the H200 the first epoch took 2-3x the next ones
        recent = [r.get("epoch_seconds", 0.0) for r in timed[-3:]]
        return sum(recent) / len(recent) if recent else 0.0

    def stop_reason(self) -> Optional[str]:
        """Why the protocol stops now: "max_epochs", "patience", "time_budget" or None."""
        if self.epoch >= self.cfg.max_epochs:
            return "max_epochs"
        if self.epoch > 0 and self.since_best >= self.cfg.patience:
            return "patience"
        if (self.cfg.time_budget is not None and self.history
                and self._spent_seconds() + self._next_epoch_seconds() > self.cfg.time_budget):
            return "time_budget"
        return None

    def finished(self) -> bool:
        return self.stop_reason() is not None

    def _progress(self) -> float:
        """Fraction of the run used at the start of this epoch: of max_epochs or, when it
        ends first, of the time budget."""
        progress = self.epoch / max(1, self.cfg.max_epochs)
        if self.cfg.time_budget is not None:
            progress = max(progress, self._spent_seconds() / self.cfg.time_budget)
        return min(1.0, progress)

    def _cosine_lr(self) -> float:
        """Cosine from lr to lr_min over the run (see _progress)."""
        return _cosine(self.cfg.lr, self.cfg.lr_min, self._progress())

    def _late_cosine_lr(self) -> Optional[float]:
        """late_cosine: None during the first (1 - anneal_fraction) of the run (the plateau
        protocol rules the lr there), then a cosine from the lr reached to lr_min."""
        f = self.cfg.anneal_fraction
        p = self._progress()
        if p < 1.0 - f:
            return None
        if self.anneal_start_lr is None:
            self.anneal_start_lr = self.lr
        q = min(1.0, (p - (1.0 - f)) / f) if f > 0 else 1.0
        return _cosine(self.anneal_start_lr, self.cfg.lr_min, q)

    def fit(self, stop_after: Optional[int] = None) -> None:
        """Run epochs until the protocol stops (or ``stop_after`` more epochs: a simulated
        interruption for tests)."""
        done = 0
        while not self.finished():
            if stop_after is not None and done >= stop_after:
                return
            if self.cfg.schedule == "cosine":
                self._set_lr(self._cosine_lr())
            elif self.cfg.schedule == "late_cosine":
                lr = self._late_cosine_lr()
                if lr is not None:
                    self._set_lr(lr)
            t_epoch = time.time()
            rec = {"epoch": self.epoch + 1, "lr": self.lr}
            rec.update(self.train_epoch())
            rec.update(self.validate())
            rec["epoch_seconds"] = time.time() - t_epoch
            rec = distributed.broadcast_object(rec, self.dist)  # every rank takes rank 0's decisions
            self.epoch += 1
            v = self._metric(rec)
            rec["protocol_metric"] = v
            event = None
            if v < self.best_val:
                self.best_val, self.best_epoch, self.since_best = v, self.epoch, 0
                self.best_state = copy.deepcopy({k: t.detach() for k, t in self.model.state_dict().items()})
                if self.dist.is_main:
                    save_model(os.path.join(self.run_dir, "best.pt"), self.model, self.cfg, self.class_names,
                               {"epoch": self.epoch, "protocol_metric": v})
                event = "best"
            else:
                self.since_best += 1
                plateau_rules = self.cfg.schedule == "plateau" or (
                    self.cfg.schedule == "late_cosine" and self.anneal_start_lr is None)
                if (plateau_rules and not (v <= self.best_val * (1 + self.cfg.rise_threshold))
                        and self.best_state is not None):
                    # the paper: lr / 10 and back to the best weights (momentum reset with them)
                    self.model.load_state_dict(self.best_state)
                    self.optimizer = self._optimizer(max(self.lr / 10.0, self.cfg.lr_min))
                    self._set_lr(max(self.lr / 10.0, self.cfg.lr_min))
                    event = "lr_drop_reload_best"
            rec.update({"event": event, "best_metric": self.best_val, "best_epoch": self.best_epoch,
                        "time": time.time()})
            self.history.append(rec)
            if self.dist.is_main:  # the only writer
                self.save_checkpoint()
                with open(os.path.join(self.run_dir, "log.jsonl"), "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
            log.info("epoch %d: train loss %.4f, val loss %.4f%s, %.0f img/s, lr %g%s", rec["epoch"],
                     rec["train_loss"], rec["val_loss"],
                     (", val k-NN acc %.3f" % rec["val_knn_accuracy"]) if "val_knn_accuracy" in rec else
                     (", val acc %.3f" % rec["val_accuracy"]) if "val_accuracy" in rec else "",
                     rec["images_per_s"], rec["lr"], (" [%s]" % event) if event else "")
            done += 1

    def phases(self) -> Dict[str, float]:
        """Seconds per phase of the run: setup (this process: data, model, resume), training
        steps and per-epoch validation (every epoch, also those before a resume), the
        final evaluation once it ran, and their sum."""
        train_s = sum(r.get("train_seconds", 0.0) for r in self.history)
        validate_s = sum(max(r.get("epoch_seconds", 0.0) - r.get("train_seconds", 0.0), 0.0)
                         for r in self.history)
        out = {"setup_s": self.setup_seconds, "train_s": train_s, "validate_s": validate_s}
        if getattr(self, "evaluate_seconds", None) is not None:
            out["evaluate_s"] = self.evaluate_seconds
        out["total_s"] = sum(out.values())
        return out

    def evaluate(self) -> dict:
        """The final evaluation (evaluate_model) of the best weights; results.json gets the
        training facts, the device's name and the seconds of every phase."""
        t_eval = time.time()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        epochs = self.history
        secs = sum(r["train_seconds"] for r in epochs)
        imgs = sum(r["images_per_s"] * r["train_seconds"] for r in epochs)
        extra = {"training": {"epochs": self.epoch, "best_epoch": self.best_epoch,
                              "select_by": self.cfg.select_by, "schedule": self.cfg.schedule,
                              "stopped_by": self.stop_reason(), "time_budget": self.cfg.time_budget,
                              "wall_seconds": self._spent_seconds(),
                              "best_metric": None if math.isinf(self.best_val) else self.best_val,
                              "seconds": secs, "images_per_s": imgs / secs if secs else 0.0,
                              "device": str(self.device), "device_name": device_name(self.device),
                              "backend": self.backend, "world_size": self.dist.world_size,
                              "cuda_graph": self.cfg.cuda_graph, "triplets_formed_by": self.triplets_formed_by,
                              "graph_replays": self._graph.replays if self._graph is not None else 0},
                 "data": self.data_summary}
        # the batch norms folded into the convolutions: the function of the eval-mode network,
        # one pass fewer over every feature map (what `dnnrl eval` of this run's checkpoint uses)
        results = evaluate_model(fold_batch_norm(self.model), self.data, self.class_names, self.aug, self.device,
                                 self.cfg.method, self.backend, self.run_dir, k_max=self.cfg.k_max,
                                 amp=self.cfg.amp, channels_last=self.channels_last,
                                 batch_size=self.cfg.eval_batch_size, extra=extra, dist=self.dist)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.evaluate_seconds = time.time() - t_eval
        results["training"]["phases"] = self.phases()
        if self.dist.is_main:  # results.json was written before the evaluation's time was known
            write_results(results, self.run_dir)
        return results


def write_curves(run_dir: str) -> Optional[str]:
    """curves.png from the run's log.jsonl (dnnrl.curves); a failed plot is a warning,
    never the end of a run that has results to write."""
    from .curves import plot_run_dirs
    try:
        return plot_run_dirs([run_dir], os.path.join(run_dir, "curves.png"), title=os.path.basename(
            os.path.abspath(run_dir)))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not cost the run
        log.warning("could not draw %s: %s", os.path.join(run_dir, "curves.png"), exc)
        return None


def _cosine(hi: float, lo: float, progress: float) -> float:
    """hi at progress 0 down to lo at progress 1 along half a cosine."""
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


# What a resumed run may change: how long it goes on, and where and with what it runs
# (the device and backend of another machine, its cache, its logging); not what it computes.
RESUME_OVERRIDABLE = ("max_epochs", "time_budget", "patience", "device", "backend", "cache_dir", "log_every",
                      "eval_batch_size")


def is_unfinished_run(out: str) -> bool:
    """Whether run directory ``out`` holds a run that was cut short: a checkpoint.pt and
    no results.json (what ``--resume`` continues)."""
    return os.path.exists(os.path.join(out, "checkpoint.pt")) and not os.path.exists(os.path.join(out, "results.json"))


def selection_metric(cfg: Config) -> str:
    """The select_by a run can honour: "val_knn", and "val_accuracy" for the k-NN methods,
    read the k-NN monitor, which a dnn run and --monitor-gallery 0 do without; those runs
    select by the val loss (Trainer._metric's fallback)."""
    needs_monitor = cfg.select_by == "val_knn" or (cfg.select_by == "val_accuracy" and cfg.method != "dnn")
    if needs_monitor and (cfg.method == "dnn" or cfg.monitor_gallery <= 0):
        return "val_loss"
    return cfg.select_by


def train(cfg: Config, resume: bool = False, stop_after: Optional[int] = None,
          resume_given: Optional[Iterable[str]] = None, overwrite: bool = False) -> Optional[dict]:
    """Train (or resume) and evaluate; returns the results dict (None when stopped early
    by ``stop_after``). Writes config.json, log.jsonl, checkpoint.pt, best.pt,
    results.json, report.md and confusion matrices into ``cfg.out``.

    On resume the run's saved config rules, in ``cfg.out`` (also when the run directory
    was moved since), except for RESUME_OVERRIDABLE fields: taken from ``cfg`` when named
    in ``resume_given`` (the CLI passes the options given on its command line), or all
    of them when ``resume_given`` is None (an API caller's explicit config).

    A fresh run (no ``resume``) into a directory that holds an unfinished run
    (checkpoint.pt without results.json) raises ValueError unless ``overwrite``: the
    first epoch would replace that run's checkpoint, and with it its progress."""
    if not resume and not overwrite and is_unfinished_run(cfg.out):
        raise ValueError("%s holds an unfinished run (checkpoint.pt, no results.json): --resume continues it, "
                         "--overwrite starts over in its place, or choose another --out" % cfg.out)
    if resume and not os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):  # before any data is read
        raise FileNotFoundError("--resume: no checkpoint at %s (a run writes one after each epoch; start "
                                "this one without --resume)" % os.path.join(cfg.out, "checkpoint.pt"))
    ignored = []
    if resume and os.path.exists(os.path.join(cfg.out, "config.json")):
        saved = Config.load(os.path.join(cfg.out, "config.json"))
        given = RESUME_OVERRIDABLE if resume_given is None else set(resume_given) & set(RESUME_OVERRIDABLE)
        for name in given:
            setattr(saved, name, getattr(cfg, name))
        ignored = sorted(n for n in set(resume_given or ()) - set(RESUME_OVERRIDABLE) - {"out", "progress"}
                         if getattr(cfg, n) != getattr(saved, n))
        saved.progress = cfg.progress
        saved.out = cfg.out  # the directory it is resumed in, wherever it was first written
        cfg = saved
    validate(cfg)  # an API caller's own Config, or a resumed run's overrides
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, resume, stop_after, ignored)
    finally:
        distributed.cleanup()


def _train(cfg: Config, ctx, resume: bool, stop_after: Optional[int], ignored=()) -> Optional[dict]:
    # only rank 0 writes the run directory (other ranks log warnings to stderr)
    setup_logging(cfg.out if ctx.is_main else None, logging.INFO if ctx.is_main else logging.WARNING)
    if ignored:
        log.warning("--resume continues the run as its config.json says: ignoring the given %s (a resumed run "
                    "may change only %s)", ", ".join(ignored), ", ".join(RESUME_OVERRIDABLE))
    if cfg.method != "dnn" and selection_metric(cfg) != cfg.select_by:
        log.warning("--select-by %s reads the k-NN monitor, which --monitor-gallery 0 turns off: this run "
                    "selects its best epoch (and the lr drops and patience) by the val loss", cfg.select_by)
    t0 = time.time()
    trainer = Trainer(cfg, resume=resume)
    if ctx.is_main:
        cfg.save(os.path.join(cfg.out, "config.json"))
    loss = {"dnnrl": "exp triplet loss: mining %s, alpha %g, gamma %g, reduction %s"
                      % (cfg.mining, cfg.alpha, cfg.gamma, cfg.reduction),
            "tdnn": "hinge triplet loss: mining %s, margin %g, gamma %g, reduction %s"
                    % (cfg.mining, cfg.margin, cfg.gamma, cfg.reduction),
            "dnn": "softmax loss"}[cfg.method]
    if cfg.method != "dnn":
        loss += ", triplets formed by the %s" % {"op": "fused op", "python": "app in Python"}[
            trainer.triplets_formed_by]
    if cfg.method != "dnn" and cfg.softmax_weight > 0:
        loss += ", + %g x softmax" % cfg.softmax_weight
    log.info("method %s, device %s, backend %s, preset %s, image %d, width %g, sampler %s, %s", cfg.method,
             trainer.device, trainer.backend, cfg.preset, cfg.image_size, cfg.width, cfg.sampler, loss)
    if ctx.enabled:
        log.info("distributed: %d processes (%s), mining scope %s, global batch %d",
                 ctx.world_size, torch.distributed.get_backend(), cfg.mining_scope, cfg.batch_size)
    trainer.fit(stop_after=stop_after)
    if ctx.is_main:
        write_curves(cfg.out)
    if not trainer.finished():
        return None
    results = trainer.evaluate()
    log.info("run finished in %.1f s; results in %s", time.time() - t0,
             os.path.join(cfg.out, "results.json"))
    return results
