"""Operations one training step dispatches, by phase: a device-free proxy for the kernel
launches that bound a CUDA step at batch 128 (docs/app.md, "GPU").

Each phase of `Trainer.train_step` (augmentation, forward + loss, backward, optimiser
step) runs once under a dispatch mode that counts the aten ops reaching the backend. Views
and other metadata-only ops (select, view, detach, ...) launch nothing on a GPU, so they
are counted apart from the compute ops. On a CUDA device the profile of
`bench_train.py --profile-steps` gives the launches themselves; this script gives the
count on any machine, so a change to the step can be checked for extra launches
without a GPU. The optimiser phase depends on the device (CUDA: fused SGD, one kernel;
elsewhere torch's per-parameter loop), so compare it only between runs on one device.

Usage:  python3 benchmarks/count_step_ops.py [--method M]... [--out F.json] [dnnrl train options]
(default: the three methods, the Table 1 network at 108 px on the built-in synthetic
set, on the CPU, with the recipe of gpu_session.sh; `--preset cpu` for the small one).
"""
import argparse
import collections
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "python")]
sys.path.insert(0, HERE)
import bench_train  # noqa: E402

# ops that only make a new view of a tensor, allocate, or mark a profiler range: no kernel
METADATA_OPS = frozenset({
    "aten.alias", "aten.as_strided", "aten.detach", "aten.empty", "aten.empty_like", "aten.empty_strided",
    "aten.expand", "aten.permute", "aten.select", "aten.slice", "aten.squeeze", "aten.t", "aten.transpose",
    "aten.unbind", "aten.unsqueeze", "aten.view", "aten._unsafe_view", "aten.scalar_tensor",
    "profiler._record_function_enter_new", "profiler._record_function_exit",
})
PHASES = ("augment", "forward_loss", "backward", "optimizer")


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by name (``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def compute_ops(counts) -> int:
    """The ops of ``counts`` that do work on the data (not METADATA_OPS)."""
    return sum(n for name, n in counts.items() if name not in METADATA_OPS)


def count_step(trainer) -> dict:
    """One training step of ``trainer`` (after one step uncounted, which takes the first
    step's one-off work out), phase by phase as `Trainer.train_step` does it.

    Returns {phase: {"compute": int, "all": int, "counts": {op: count}}} for the phases
    in PHASES, and "total_compute".
    """
    from dnnrl.transforms import augment
    trainer.model.train()
    batches = trainer.sampler.epoch(trainer.sample_gen)
    trainer.train_step(next(batches))
    idx = next(batches)
    x_all, y_all = trainer.data["train"]
    counters = {p: OpCounter() for p in PHASES}
    # the body of Trainer.train_step, cut into its phases (tests/test_benchmark_tools.py
    # checks that both dispatch the same ops)
    with counters["augment"]:
        xb = x_all[idx.to(x_all.device)].to(trainer.device, non_blocking=True)
        yb = y_all[idx]
        x = trainer._prep(augment(xb, trainer.aug, trainer.aug_gen))
    with counters["forward_loss"]:
        loss, _ = trainer._loss(x, yb)
    with counters["backward"]:
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with counters["optimizer"]:
        trainer.optimizer.step()
    out = {p: {"compute": compute_ops(c.counts), "all": sum(c.counts.values()),
               "counts": dict(c.counts.most_common())} for p, c in counters.items()}
    out["total_compute"] = sum(out[p]["compute"] for p in PHASES)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--method", action="append", choices=("dnn", "tdnn", "dnnrl"), default=None,
                   help="methods to count (repeatable; default all three)")
    p.add_argument("--out", default=None, help="write the counts as JSON here")
    args, train_argv = p.parse_known_args(argv)
    if "--preset" not in train_argv:
        train_argv = ["--preset", "paper"] + train_argv
    if "--device" not in train_argv:
        train_argv = ["--device", "cpu"] + train_argv
    train_argv = bench_train.RECIPE + train_argv
    rows = {}
    for method in args.method or ["dnn", "tdnn", "dnnrl"]:
        trainer = bench_train.trainer_for(method, train_argv, 2)
        r = count_step(trainer)
        r.update(device=str(trainer.device), batch_size=trainer.cfg.batch_size,
                 image_size=trainer.cfg.image_size, width=trainer.cfg.width)
        rows[method] = r
        print("%-6s compute ops: %s; total %d (device %s, batch %d, %d px)"
              % (method, ", ".join("%s %d" % (ph, r[ph]["compute"]) for ph in PHASES), r["total_compute"],
                 r["device"], r["batch_size"], r["image_size"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"train_options": train_argv, "torch": torch.__version__, "methods": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
