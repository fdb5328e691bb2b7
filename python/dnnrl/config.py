"""Run configuration: one dataclass, presets, and JSON round-trip."""
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

METHODS = ("dnnrl", "tdnn", "dnn")
TTA_MODES = ("none", "flip", "crops")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCHEDULES = ("plateau", "cosine", "late_cosine")
# protocol metrics: the validation loss (the paper), the k-NN error of the per-epoch monitor,
# or the error of the accuracy the method is scored by (softmax head for dnn, k-NN monitor else)
SELECT_BY = ("val_loss", "val_knn", "val_accuracy")
# what each select_by minimises, as logs and reports name it
SELECT_BY_NAMES = {"val_loss": "val loss", "val_knn": "val k-NN error", "val_accuracy": "val error"}
SWITCHES = ("auto", "on", "off")


@dataclass
class Config:
    """Everything a run depends on; saved as config.json in the run directory."""
    # what to train
    method: str = "dnnrl"            # dnnrl: exp triplet + k-NN; tdnn: hinge triplet + k-NN; dnn: softmax
    data: Optional[str] = None        # CSV / folder / archive; None = the synthetic set
    out: str = "runs/demo"
    preset: Optional[str] = None      # "paper" (Table 1 at 108 px) or "cpu" (reduced); None = by data
    # network and input
    image_size: int = 108             # network input side (the paper's 108)
    width: float = 1.0                # channel multiplier (1.0 = Table 1)
    embed_dim: int = 512
    dropout: float = 0.2
    init_from: Optional[str] = None   # start from these weights (a run dir / best.pt / checkpoint.pt),
                                      # e.g. a dnn (softmax) run to fine-tune with a triplet loss
    flip: bool = False                # random horizontal flips (not in the paper)
    erase: float = 0.0                # chance of random erasing per training image (not in the paper)
    tta: str = "none"                 # test-time averaging: "none", "flip" (image + its mirror image) or
                                      # "crops" (5 positions, centre and 4 px diagonal shifts, x mirror)
    # loss and batches
    batch_size: int = 128
    sampler: str = "pk"               # "random" (the paper) or "pk" (class-balanced P x K)
    mining: str = "semi_hard"         # "batch_hard", "semi_hard", "random_triplets" (the paper's literal)
                                      # or "easy_positive" (nearest positive + nearest negative)
    alpha: float = 0.2
    gamma: float = 0.0                # exp loss margin (the paper's 0; learns with semi_hard on the
                                      # synthetic set; on FER-2013 nothing tried learns yet, docs/app.md)
    margin: float = 0.2               # hinge margin (tdnn)
    reduction: str = "sum"            # triplet loss over the batch: "sum" (the paper's Eq. 1) or "mean"
    softmax_weight: float = 0.0       # dnnrl / tdnn: add this x cross-entropy of the softmax head
                                      # (joint training; 0 = the paper's pure triplet loss)
    label_smoothing: float = 0.0      # of the softmax head's cross-entropy in training (not in the paper)
    mining_scope: str = "global"      # torchrun runs: mine in the global batch or in each rank's shard
    # optimisation and protocol (SPEC section 6)
    lr: float = 0.01
    lr_min: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    select_by: str = "val_loss"       # protocol metric, one of SELECT_BY: "val_loss" (the paper), ...
    schedule: str = "plateau"         # "plateau": the paper's lr / 10 + reload best on a rise;
                                      # "cosine": lr -> lr_min along a cosine over max_epochs;
                                      # "late_cosine": plateau, then a cosine over the last part
    anneal_fraction: float = 0.25     # late_cosine: the final fraction of the run (epochs or budget)
    rise_threshold: float = 0.10      # val loss > (1 + this) * best -> lr / 10, reload best
    patience: int = 20                # stop after this many epochs without a new best
    max_epochs: int = 200
    time_budget: Optional[float] = None   # seconds of training: no epoch starts that would end past it
    epoch_batches: Optional[int] = None   # cap on batches per epoch (reduced runs)
    train_subset: Optional[int] = None    # use a stratified random subset of the training set
    val_subset: Optional[int] = None
    # evaluation
    k_max: int = 50
    monitor_gallery: int = 2000       # train images used for the per-epoch val k-NN accuracy (0: off)
    # data options
    skip_bad: bool = False
    cache_dir: Optional[str] = None
    synthetic_train_per_class: int = 1000
    synthetic_val_per_class: int = 100
    synthetic_test_per_class: int = 200
    # machinery
    seed: int = 0
    device: str = "auto"              # "auto" = cuda when available
    backend: str = "auto"             # dnnrl_ext backend: "auto" (compiled) or "reference"
    amp: str = "auto"                 # "auto" = bf16 autocast on cuda; "bf16"; "off"
    channels_last: str = "auto"       # "auto" = on cuda and cpu
    cudnn_benchmark: str = "auto"     # cuDNN picks its convolution algorithms by timing them
                                      # ("auto" = on cuda: the input shape is fixed); "on" / "off"
    cuda_graph: str = "off"           # "on": the network's training fwd + bwd replayed as CUDA graphs
    compile: bool = False             # torch.compile the model
    compile_mode: str = "default"     # torch.compile mode: "default", "reduce-overhead" (CUDA graphs),
                                      # "max-autotune", "max-autotune-no-cudagraphs"
    log_every: int = 50               # steps between host syncs for the progress bar (none without it)
    progress: bool = True             # tqdm bars
    eval_batch_size: int = 512

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def load(cls, path: str) -> "Config":
        with open(path) as fh:
            return cls.from_dict(json.load(fh))


# Values a preset sets unless the user gave them explicitly.
PRESETS = {
    # the paper's network and protocol
    "paper": {},
    # reduced scale for a CPU: the synthetic demo finishes in a few minutes on 2 cores
    "cpu": {"image_size": 48, "width": 0.25, "lr": 0.001, "max_epochs": 15, "patience": 5,
            "select_by": "val_knn",
            "monitor_gallery": 1000},
}


def resolve(overrides: Dict[str, Any]) -> Config:
    """Defaults <- preset <- explicit overrides (None values in overrides are ignored).

    Without ``data`` (the synthetic set) the preset defaults to "cpu"; with data, "paper".
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    preset = given.get("preset") or ("cpu" if not given.get("data") else "paper")
    if preset not in PRESETS:
        raise ValueError("preset must be one of %s, got %r" % (sorted(PRESETS), preset))
    values = dict(PRESETS[preset])
    values.update(given)
    values["preset"] = preset
    cfg = Config.from_dict(values)
    validate(cfg)
    return cfg


# Fields with a fixed set of values (the CLI's choices; API callers reach here directly).
CHOICES = {
    "method": METHODS, "compile_mode": COMPILE_MODES, "schedule": SCHEDULES, "select_by": SELECT_BY,
    "cuda_graph": ("on", "off"), "cudnn_benchmark": SWITCHES, "channels_last": SWITCHES, "tta": TTA_MODES,
    "amp": ("auto", "bf16", "off"), "sampler": ("random", "pk"),
    "mining": ("batch_hard", "semi_hard", "random_triplets", "easy_positive"), "reduction": ("sum", "mean"),
    "mining_scope": ("global", "local"), "backend": ("auto", "compiled", "reference"),
}

# The network's smallest input side: below it a max pool has nothing left to pool.
MIN_IMAGE_SIZE = 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A finite int or float (NaN and inf fail every range test below anyway, but say so)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _int_at_least(lo: int):
    return (lambda v: _is_int(v) and v >= lo), "an integer >= %d" % lo


def _optional_int_at_least(lo: int):
    return (lambda v: v is None or (_is_int(v) and v >= lo)), "None or an integer >= %d" % lo


# field -> (test, what is expected). Each number a run depends on is checked before any data
# is read, so a bad value fails in a second with its name, not minutes later inside torch.
RANGES = {
    "image_size": _int_at_least(MIN_IMAGE_SIZE),
    "width": (lambda v: _is_real(v) and v > 0, "a positive number"),
    "embed_dim": _int_at_least(1),
    "dropout": (lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
    "erase": (lambda v: _is_real(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "batch_size": _int_at_least(2),
    "alpha": (lambda v: _is_real(v) and v > 0, "a positive number"),
    "gamma": (_is_real, "a finite number"),
    "margin": (_is_real, "a finite number"),
    "softmax_weight": (lambda v: _is_real(v) and v >= 0, ">= 0 and finite"),
    "label_smoothing": (lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: _is_real(v) and v > 0, "a positive number"),
    "lr_min": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
    "momentum": (lambda v: _is_real(v) and 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
    "anneal_fraction": (lambda v: _is_real(v) and 0 < v <= 1, "in (0, 1]"),
    "rise_threshold": (lambda v: _is_real(v) and v >= 0, "a number >= 0"),
    "patience": _int_at_least(1),
    "max_epochs": _int_at_least(1),
    "time_budget": (lambda v: v is None or (_is_real(v) and v > 0), "a positive number of seconds"),
    "epoch_batches": _optional_int_at_least(1),
    "train_subset": _optional_int_at_least(1),
    "val_subset": _optional_int_at_least(1),
    "k_max": _int_at_least(1),
    "monitor_gallery": _int_at_least(0),
    "synthetic_train_per_class": _int_at_least(1),
    "synthetic_val_per_class": _int_at_least(1),
    "synthetic_test_per_class": _int_at_least(1),
    "seed": _int_at_least(0),
    "log_every": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
}


# Options that have no effect in some runs: (field, the runs that ignore it, why). A value
# given for one of them is named in a warning rather than dropped in silence.
_IGNORED_WHEN = (
    ("alpha", lambda c: c.method != "dnnrl", "alpha is the exp loss's slope (method dnnrl)"),
    ("gamma", lambda c: c.method == "dnn", "gamma belongs to the triplet methods (dnnrl, tdnn)"),
    ("margin", lambda c: c.method != "tdnn", "margin is the hinge loss's (method tdnn)"),
    ("mining", lambda c: c.method == "dnn", "the softmax method mines no triplets"),
    ("reduction", lambda c: c.method == "dnn", "reduction is the triplet loss's"),
    ("softmax_weight", lambda c: c.method == "dnn", "dnn is the softmax loss alone"),
    ("label_smoothing", lambda c: c.method != "dnn" and c.softmax_weight == 0,
     "label smoothing acts on the softmax head's loss, which a triplet run trains only with --softmax-weight > 0"),
    ("monitor_gallery", lambda c: c.method == "dnn", "the k-NN monitor follows the triplet methods"),
    ("compile_mode", lambda c: not c.compile, "compile_mode applies with --compile"),
)


def ignored_options(cfg: Config, given) -> List[Tuple[str, str]]:
    """(field, why) for each option in ``given`` (field names) that ``cfg``'s run ignores."""
    return [(name, why) for name, ignored, why in _IGNORED_WHEN if name in given and ignored(cfg)]


def validate(cfg: Config) -> Config:
    """Raise a ValueError naming the first field with a value a run cannot use; returns cfg.

    Checks the choices, the numeric ranges and the combinations; the device is checked
    where it is opened (:func:`dnnrl.runtime.pick_device`)."""
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ValueError("%s must be one of %s, got %r" % (name, allowed, value))
    for name, (ok, expected) in RANGES.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise ValueError("%s must be %s, got %r" % (name, expected, value))
    if cfg.lr_min > cfg.lr:
        raise ValueError("lr_min (%r) must not exceed lr (%r): it is the floor the lr decays to"
                         % (cfg.lr_min, cfg.lr))
    if cfg.cuda_graph == "on" and cfg.compile:
        raise ValueError("cuda_graph 'on' does not combine with compile (torch.compile with "
                         "compile_mode='reduce-overhead' records its own CUDA graphs)")
    return cfg
