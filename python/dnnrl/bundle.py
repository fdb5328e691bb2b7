"""The model bundle: one file to predict with, no training data needed.

A bundle is a ``torch.save`` dict::

    format          "dnnrl-bundle-1"
    config          Config.to_dict() of the run (network width, image size, ...)
    class_names     ["angry", ..., "neutral"]
    model           state_dict, floating tensors in float16
    gallery         (N, d) float16 k-NN gallery: embeddings of the training split
                    (projected to d dims when ``projection`` is set)
    gallery_labels  (N,) uint8
    projection      None, or {"mean": (D,) float32, "components": (D, d) float32}:
                    a PCA of the gallery; queries are mapped q -> (q - mean) @ components
    k               neighbours, chosen on the validation split with the stored gallery
    meta            how it was made: training run facts, export command, commit,
                    device, wall time, val accuracies (float32 full gallery vs stored)

Why a PCA and per-class subsampling exist: the Table 1 network is ~3.4 M parameters
(6.8 MB in float16) and the full FER-2013 gallery 28,709 x 512 x 2 B = 29 MB; a
shipped bundle must stay under 12 MB, so ``gallery_dim`` (PCA) and
``gallery_per_class`` (a seeded random subset of each class) trade size for
accuracy, and :func:`export_bundle` measures that trade on the validation split
(``pca_sweep`` in its facts).
"""
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from dnnrl_ext import KNNClassifier, knn_vote

from .config import TTA_MODES, Config

log = logging.getLogger("dnnrl")

FORMAT = "dnnrl-bundle-1"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_BUNDLE = os.path.join(ASSETS, "dnnrl_fer2013.pt")
SHIP_LIMIT_MB = 12.0
# what "auto" aims under: 12 MB in decimal megabytes, the stricter reading of issue 5's limit
SHIP_LIMIT_BYTES = 12e6


class BundleError(ValueError):
    """A bundle (or checkpoint) cannot be used; the message says why and what to do."""


class ProjectedKNNClassifier(KNNClassifier):
    """A :class:`dnnrl_ext.KNNClassifier` whose gallery lives in a PCA space: every query
    (Q, D) is mapped to (Q, d) by ``(q - mean) @ components`` before the search.

    Without a projection (``mean``/``components`` None) it is a plain KNNClassifier.
    """

    def __init__(self, k: int = 1, num_classes: Optional[int] = None, backend: str = "auto",
                 mean: Optional[Tensor] = None, components: Optional[Tensor] = None):
        super().__init__(k=k, num_classes=num_classes, backend=backend)
        self.mean, self.components = mean, components

    def project(self, x) -> Tensor:
        """(Q, D) embeddings -> (Q, d) gallery coordinates (identity without a projection)."""
        t = torch.as_tensor(x)
        if not t.is_floating_point():
            t = t.float()
        if self.components is None:
            return t
        m, c = self.mean.to(t.device, torch.float32), self.components.to(t.device, torch.float32)
        return (t.float() - m) @ c

    def _query(self, x) -> Tensor:
        return super()._query(self.project(x))

    def vote(self, embeddings) -> Tuple[Tensor, Tensor]:
        """One neighbour search -> (pred (Q,) int64 under knn_vote's tie rule,
        shares (Q, num_classes) float32 = votes / k)."""
        self._check_fitted()
        pred, votes = knn_vote(self._query(embeddings), self.gallery, self.gallery_labels, self.k,
                               self.num_classes, return_votes=True, backend=self.backend)
        return pred, votes.float() / self.k

    def to(self, device) -> "ProjectedKNNClassifier":
        self.gallery = self.gallery.to(device)
        self.gallery_labels = self.gallery_labels.to(device)
        if self.components is not None:
            self.mean, self.components = self.mean.to(device), self.components.to(device)
        return self


# --------------------------------------------------------------------------- helpers
def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def fit_pca(x: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """PCA of (N, D) rows: (mean (D,), components (D, dim)) float32, ordered by variance,
    signs fixed so each column's largest entry is positive (deterministic).

    N > D: eigenvectors of the D x D covariance (one pass over the data); N <= D: an SVD
    of the centred rows (LAPACK's eigh is slow on a rank-deficient covariance).
    """
    x = x.float()
    mean = x.mean(0)
    xc = x - mean
    dim = min(int(dim), x.shape[1])
    if x.shape[0] > x.shape[1]:
        evals, evecs = torch.linalg.eigh((xc.T @ xc).double())
        comps = evecs[:, torch.argsort(evals, descending=True)[:dim]].float()
    else:
        _, _, vh = torch.linalg.svd(xc.double(), full_matrices=False)
        comps = vh.T[:, :dim].float()
        if comps.shape[1] < dim:  # fewer rows than dims: pad with zero directions
            comps = torch.cat([comps, comps.new_zeros(x.shape[1], dim - comps.shape[1])], 1)
    sign = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return mean.cpu(), comps.cpu()


def _subsample(labels: np.ndarray, per_class: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices keeping at most ``per_class`` rows of each class (seeded)."""
    if not per_class:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _half_state(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
            for k, v in state.items()}


def _val_accuracy(clf: KNNClassifier, emb: Tensor, y: Tensor, k_max: int) -> Tuple[int, float]:
    k = clf.select_k(emb, y, k_max)
    return k, clf.val_accuracy_per_k[k]


def _load_data(data, cache_dir: Optional[str] = None):
    """A data path / Dataset / {split: (x, y)} dict -> ({split: (uint8 (N,S,S), int64 (N,))}, source)."""
    from .data import Dataset, load_dataset
    from .runtime import carve_validation
    if isinstance(data, (str, os.PathLike)):
        ds = load_dataset(str(data), cache_dir=cache_dir)
        carve_validation(ds)  # k is chosen on the validation split training steered by
        return ds.splits, str(data), ds.class_names
    if isinstance(data, Dataset):
        return data.splits, data.source, data.class_names
    if isinstance(data, dict):
        return data, "<in-memory>", None
    raise TypeError("data must be a path, a dnnrl.data.Dataset or {split: (images, labels)}, got %s"
                    % type(data).__name__)


def run_data(cfg: Config, checkpoint: str):
    """The data a run was trained on, for export / predict without --data: its data file
    while it is still where training read it, or the built-in synthetic set regenerated
    with the run's sizes and seed (the quick start's run)."""
    if cfg.data:
        if not os.path.exists(cfg.data):
            raise BundleError("%s was trained on %s, which is not there now: pass the training data with --data"
                              % (checkpoint, cfg.data))
        return cfg.data
    from .synthetic import make_synthetic
    return make_synthetic(cfg.synthetic_train_per_class, cfg.synthetic_val_per_class,
                          cfg.synthetic_test_per_class, seed=cfg.seed)


def model_from_state(cfg: Config, num_classes: int, state: Dict[str, Tensor],
                     device: Union[str, torch.device] = "cpu"):
    """The network of ``cfg`` with ``state`` loaded (float32) on ``device``, for inference:
    its batch norms folded into the convolutions (:func:`dnnrl.model.fold_batch_norm`; eval
    mode only)."""
    from .model import DNNRLNet, fold_batch_norm
    from .runtime import use_channels_last
    device = torch.device(device)
    model = DNNRLNet(num_classes=num_classes, width=cfg.width, embed_dim=cfg.embed_dim, dropout=cfg.dropout)
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    model = model.to(device).eval()
    if use_channels_last(cfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return fold_batch_norm(model)


def load_checkpoint(path: str):
    """(file path, Config, class_names, state_dict) of a ``dnnrl train`` run directory or a
    best.pt / checkpoint.pt file (the best weights when the file has them)."""
    from .cli import _load_checkpoint
    if not os.path.exists(path):
        raise BundleError("checkpoint %s does not exist" % path)
    try:
        return _load_checkpoint(path)
    except (FileNotFoundError, ValueError) as exc:  # the message names the file and the problem
        raise BundleError(str(exc)) from None


def is_bundle_file(path: str) -> bool:
    """True when ``path`` is a file holding a dnnrl bundle (reads the file)."""
    if not os.path.isfile(path):
        return False
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return isinstance(st, dict) and st.get("format") == FORMAT


# --------------------------------------------------------------------------- build / export
def _auto_gallery_dim(state: Dict[str, Tensor], rows: int, dim: int, limit_bytes: float) -> Optional[int]:
    """The largest PCA dimension whose bundle file stays under ``limit_bytes`` (None: the
    full float16 gallery fits). The file is ~ base + d (2 rows + 4 dim) bytes (float16
    gallery rows, float32 PCA components); base is measured by saving the weights and
    labels, plus 64 KB of slack for torch.save's per-tensor records and the meta."""
    import io
    buf = io.BytesIO()
    torch.save({"model": _half_state(state), "labels": torch.zeros(rows, dtype=torch.uint8),
                "mean": torch.zeros(dim)}, buf)
    base = buf.tell() + 64 * 1024
    if base + 2 * rows * dim <= limit_bytes:
        return None
    d = int((limit_bytes - base) // (2 * rows + 4 * dim))
    if d < 1:
        raise BundleError("the weights alone (%.1f MB) leave no room for a gallery under %.1f MB"
                          % (base / 2 ** 20, limit_bytes / 2 ** 20))
    return min(d, dim)


def _is_dim(d, embed_dim: int) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= embed_dim


def _check_dims(gallery_dim, sweep_dims: Sequence[int], gallery_per_class, embed_dim: int) -> None:
    """BundleError naming the argument for a PCA dimension outside [1, embed_dim] or a
    per-class cap below 1 (PCA cannot keep more dimensions than the embedding has)."""
    if not (gallery_dim is None or gallery_dim == "auto" or _is_dim(gallery_dim, embed_dim)):
        raise BundleError("gallery_dim must be an integer in [1, %d] (the model's embedding size), 'auto' or "
                          "None, got %r" % (embed_dim, gallery_dim))
    bad = [d for d in sweep_dims if not _is_dim(d, embed_dim)]
    if bad:
        raise BundleError("sweep_dims must be integers in [1, %d] (the model's embedding size), got %s"
                          % (embed_dim, ", ".join(map(repr, bad))))
    if gallery_per_class is not None and (isinstance(gallery_per_class, bool)
                                          or not isinstance(gallery_per_class, int) or gallery_per_class < 1):
        raise BundleError("gallery_per_class must be an integer >= 1 or None, got %r" % (gallery_per_class,))


def build_bundle(checkpoint: str, data, k_max: int = 50, gallery_dim: Optional[Union[int, str]] = None,
                 gallery_per_class: Optional[int] = None, half: bool = True,
                 device: Union[str, torch.device] = "auto", batch_size: int = 512, seed: int = 0,
                 sweep_dims: Sequence[int] = (), meta: Optional[dict] = None,
                 cache_dir: Optional[str] = None, backend: str = "auto",
                 tta: Optional[str] = None) -> Tuple[dict, dict]:
    """Make a bundle in memory from a trained checkpoint and its data.

    Args:
        checkpoint: a run directory or best.pt / checkpoint.pt.
        data: the training data (path, Dataset or {split: (images, labels)}); needs
            "train" (the gallery); "val" chooses k (else k = 1... k_max is not tried).
            None: the run's own (:func:`run_data`).
        gallery_dim: PCA dimension d of the stored gallery (None: the full embedding;
            "auto": the largest d whose file stays under the ship limit, SHIP_LIMIT_BYTES).
        gallery_per_class: keep at most this many gallery rows per class (None: all).
        half: store weights and gallery in float16 (the shipped format).
        sweep_dims: also measure val accuracy of these PCA dims (facts["pca_sweep"]).
        meta: extra facts stored in bundle["meta"] (e.g. the training command).
        backend: dnnrl_ext backend ("auto": the compiled kernels, else the reference
            with a warning; "reference").
        tta: test-time averaging of the bundle ("none", "flip", "crops"; None: the
            run's): the gallery is embedded with it and predictions use it.
    Returns:
        (bundle dict, facts dict of measured numbers).
    """
    from .runtime import device_name, embed, pick_device, resolve_backend
    from .train import augment_config
    t0 = time.time()
    ck_path, cfg, class_names, state = load_checkpoint(checkpoint)
    _check_dims(gallery_dim, sweep_dims, gallery_per_class, cfg.embed_dim)  # before minutes of embedding
    if tta is not None:
        if tta not in TTA_MODES:
            raise BundleError("tta must be one of %s, got %r" % (", ".join(TTA_MODES), tta))
        cfg.tta = tta
    splits, source, data_names = _load_data(run_data(cfg, ck_path) if data is None else data, cache_dir)
    if "train" not in splits:
        raise BundleError("the data %s has no training split to use as the k-NN gallery" % source)
    if data_names is not None and list(data_names) != list(class_names):
        raise BundleError("the data's classes %s differ from the model's %s" % (data_names, class_names))
    C = len(class_names)
    dev = pick_device(str(device))
    backend = resolve_backend(backend, dev)
    model = model_from_state(cfg, C, state, dev)
    aug = augment_config(cfg)
    amp = cfg.amp if dev.type == "cuda" else "off"

    def emb(x) -> Tensor:
        return embed(model, torch.as_tensor(np.ascontiguousarray(x)), aug, dev, amp=amp,
                     batch_size=batch_size).cpu()

    xtr, ytr = splits["train"]
    keep = _subsample(np.asarray(ytr), gallery_per_class, seed)
    gal32 = emb(np.asarray(xtr)[keep])
    ygal = torch.as_tensor(np.asarray(ytr)[keep]).long()
    t_embed = time.time() - t0
    if gallery_dim == "auto":
        gallery_dim = _auto_gallery_dim(state, int(gal32.shape[0]), int(gal32.shape[1]),
                                        SHIP_LIMIT_BYTES)
    has_val = "val" in splits and len(splits["val"][1]) > 0
    facts = {"checkpoint": ck_path, "data": source, "gallery_rows": int(gal32.shape[0]),
             "gallery_rows_available": int(len(ytr)), "embed_dim": int(gal32.shape[1]),
             "gallery_dim": int(gallery_dim or gal32.shape[1]), "gallery_per_class": gallery_per_class,
             "device": device_name(dev)}
    if has_val:
        xv, yv = splits["val"]
        val = emb(np.asarray(xv))
        yval = torch.as_tensor(np.asarray(yv)).long()
        clf = KNNClassifier(num_classes=C, backend=backend).fit(gal32, ygal)
        facts["k_float32"], facts["val_accuracy_float32"] = _val_accuracy(clf, val, yval, k_max)
        facts["val_size"] = int(yval.shape[0])
    mean = comps = None
    stored = gal32
    if gallery_dim is not None and gallery_dim < gal32.shape[1]:
        mean, comps = fit_pca(gal32, int(gallery_dim))
        stored = (gal32 - mean) @ comps
    dtype = torch.float16 if half else torch.float32
    stored = stored.to(dtype)
    final = ProjectedKNNClassifier(num_classes=C, backend=backend, mean=mean, components=comps)
    final.fit(stored.float(), ygal)
    if has_val:
        facts["k"], facts["val_accuracy"] = _val_accuracy(final, val, yval, k_max)
        facts["val_accuracy_per_k"] = final.val_accuracy_per_k
        if sweep_dims:
            sweep = {}
            big_mean, big = fit_pca(gal32, min(max(sweep_dims), gal32.shape[1]))
            for d in sorted(set(sweep_dims)):
                g = ((gal32 - big_mean) @ big[:, :d]).to(dtype).float()
                c = ProjectedKNNClassifier(num_classes=C, backend=backend, mean=big_mean,
                                           components=big[:, :d]).fit(g, ygal)
                k_d, acc_d = _val_accuracy(c, val, yval, k_max)
                sweep[d] = {"k": k_d, "val_accuracy": acc_d,
                            "gallery_mb": g.shape[0] * d * (2 if half else 4) / 2 ** 20}
            facts["pca_sweep"] = sweep
    else:
        final.k = 1
        facts["k"] = 1
        log.warning("no validation split: k = 1 (nothing to choose it on)")
    if comps is not None:
        facts["pca_explained_variance"] = float(((gal32 - mean) @ comps).var(0).sum() / gal32.var(0).sum())
    bundle = {
        "format": FORMAT, "config": cfg.to_dict(), "class_names": list(class_names),
        "model": _half_state(state) if half else {k: v.detach().cpu() for k, v in state.items()},
        "gallery": stored.contiguous(), "gallery_labels": ygal.to(torch.uint8 if C <= 256 else torch.int64),
        "projection": None if comps is None else {"mean": mean, "components": comps},
        "k": int(final.k),
    }
    facts["build_seconds"] = time.time() - t0
    facts["embed_seconds"] = t_embed
    bundle["meta"] = _meta(ck_path, cfg, facts, meta)
    return bundle, facts


def _meta(ck_path: str, cfg: Config, facts: dict, extra: Optional[dict]) -> dict:
    """Provenance: the training run's own record (results.json beside the checkpoint)
    plus how the bundle was made."""
    import json
    meta = {"checkpoint": os.path.basename(ck_path), "method": cfg.method, "preset": cfg.preset,
            "image_size": cfg.image_size, "width": cfg.width, "train_data": cfg.data,
            "export_command": " ".join(shlex.quote(a) for a in sys.argv),
            "export_commit": _git_commit(), "export_device": facts.get("device"),
            "export_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}
    try:
        st = torch.load(ck_path, map_location="cpu", weights_only=False)
        for key in ("epoch", "val_loss", "best_epoch", "best_val"):
            if isinstance(st.get(key), (int, float)):
                meta["checkpoint_" + key] = st[key]
    except Exception:  # provenance is best effort
        pass
    res_path = os.path.join(os.path.dirname(os.path.abspath(ck_path)), "results.json")
    if os.path.exists(res_path):
        try:
            with open(res_path) as fh:
                res = json.load(fh)
            meta["training"] = res.get("training")
            for key in ("val_accuracy", "test_accuracy", "k", "command", "commit"):
                if key in res:
                    meta["run_" + key] = res[key]
        except (OSError, ValueError):
            pass
    for key in ("val_accuracy", "val_accuracy_float32", "k", "k_float32", "gallery_rows", "gallery_dim",
                "gallery_per_class", "pca_explained_variance", "val_size"):
        if key in facts:
            meta[key] = facts[key]
    meta.update(extra or {})
    return meta


def reduce_gallery_dim(bundle: dict, dim: int) -> dict:
    """The bundle with its PCA gallery cut to the first ``dim`` components.

    fit_pca's components are the covariance's eigenvectors in order of variance (signs
    fixed per column), so the first ``dim`` of them are what a fit to ``dim`` gives, and each
    stored coordinate was rounded to float16 on its own: the result is the gallery an
    export with ``gallery_dim=dim`` writes from the same checkpoint, without the checkpoint.
    k and the meta's accuracies are left as they were: measure the reduced bundle (``dnnrl
    eval``) and record what it scores.

    Args:
        bundle: a bundle dict (torch.load of a bundle file) with a projection.
        dim: 1 <= dim <= its gallery's dimension.
    Returns:
        a new dict: gallery (N, dim), projection components (D, dim); meta.gallery_dim = dim.
    """
    proj = bundle.get("projection")
    if not proj or proj.get("components") is None:
        raise BundleError("reduce_gallery_dim: the bundle stores no PCA projection to cut")
    have = int(bundle["gallery"].shape[1])
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= have:
        raise BundleError("reduce_gallery_dim: dim must be an int in [1, %d] (the gallery's dimension), got %r"
                          % (have, dim))
    out = dict(bundle)
    out["gallery"] = bundle["gallery"][:, :dim].contiguous()
    out["projection"] = {"mean": proj["mean"], "components": proj["components"][:, :dim].contiguous()}
    out["meta"] = dict(bundle.get("meta") or {}, gallery_dim=dim)
    return out


def save_bundle(bundle: dict, path: str) -> int:
    """Write atomically; returns the file size in bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def export_bundle(checkpoint: str, data, out_path: str, k_max: int = 50, gallery_dim: Optional[int] = None,
                  gallery_per_class: Optional[int] = None, device: Union[str, torch.device] = "auto",
                  batch_size: int = 512, seed: int = 0, sweep_dims: Sequence[int] = (),
                  meta: Optional[dict] = None, cache_dir: Optional[str] = None, backend: str = "auto",
                  tta: Optional[str] = None) -> dict:
    """Build a float16 bundle (see the module docstring) and write it to ``out_path``.

    Returns the measured facts: k, val_accuracy (stored gallery), val_accuracy_float32 /
    k_float32 (full float32 gallery), gallery rows / dim, pca_sweep (when asked),
    file_bytes, file_mb, under_ship_limit (< 12 MB), build_seconds.
    """
    bundle, facts = build_bundle(checkpoint, data, k_max=k_max, gallery_dim=gallery_dim,
                                 gallery_per_class=gallery_per_class, half=True, device=device,
                                 batch_size=batch_size, seed=seed, sweep_dims=sweep_dims, meta=meta,
                                 cache_dir=cache_dir, backend=backend, tta=tta)
    size = save_bundle(bundle, out_path)
    facts.update({"out": out_path, "file_bytes": size, "file_mb": size / 2 ** 20,
                  "under_ship_limit": size / 2 ** 20 < SHIP_LIMIT_MB})
    if not facts["under_ship_limit"]:
        log.warning("bundle %s is %.1f MB, over the %.0f MB limit for shipping: use a smaller "
                    "--gallery-dim or --gallery-per-class", out_path, facts["file_mb"], SHIP_LIMIT_MB)
    return facts


# --------------------------------------------------------------------------- load
def bundle_from_dict(bundle: dict, device: Union[str, torch.device] = "cpu", backend: str = "auto"):
    """(model, ProjectedKNNClassifier, class_names, Config, meta) of an in-memory bundle;
    ``backend`` "auto" falls back to the reference ops (with a warning) where the
    compiled kernels are unavailable."""
    from .runtime import resolve_backend
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        got = bundle.get("format") if isinstance(bundle, dict) else type(bundle).__name__
        raise BundleError("not a dnnrl bundle (format %r, expected %r)" % (got, FORMAT))
    cfg = Config.from_dict(bundle["config"])
    names = list(bundle["class_names"])
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    model = model_from_state(cfg, len(names), bundle["model"], device)
    proj = bundle.get("projection")
    clf = ProjectedKNNClassifier(k=int(bundle["k"]), num_classes=len(names), backend=backend,
                                 mean=None if proj is None else proj["mean"].float(),
                                 components=None if proj is None else proj["components"].float())
    # float32 in memory: the kernels are fastest there; values are the stored float16 ones
    clf.fit(bundle["gallery"].float(), bundle["gallery_labels"].long())
    clf.k = int(bundle["k"])
    clf.to(device)
    return model, clf, names, cfg, dict(bundle.get("meta") or {})


def load_bundle(path: Optional[str] = None, device: Union[str, torch.device] = "cpu", backend: str = "auto"):
    """Load a bundle file -> (model in eval mode, ProjectedKNNClassifier fitted on the
    gallery, class_names, Config, meta). ``path=None``: the packaged default model."""
    path = path or default_bundle_path()
    if not os.path.exists(path):
        raise BundleError("bundle %s does not exist" % path)
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BundleError("%s: cannot read the bundle (%s: %s)" % (path, type(exc).__name__, exc)) from None
    try:
        return bundle_from_dict(bundle, device, backend)
    except BundleError as exc:
        raise BundleError("%s: %s" % (path, exc)) from None


def default_bundle_path() -> str:
    """The packaged model (``$DNNRL_BUNDLE`` overrides it); a clear error when absent."""
    path = os.environ.get("DNNRL_BUNDLE") or DEFAULT_BUNDLE
    if not os.path.exists(path) and os.environ.get("DNNRL_BUNDLE"):
        raise BundleError("$DNNRL_BUNDLE names %s, which does not exist: point it at a bundle from "
                          "`dnnrl export`, or unset it for the packaged model" % path)
    if not os.path.exists(path):
        raise BundleError(
            "no default model: %s is not installed with this copy of dnnrl. Pass --bundle FILE "
            "(made by `dnnrl export`), or a `dnnrl train` run with --data DATA (the training data "
            "becomes the k-NN gallery)." % path)
    return path
