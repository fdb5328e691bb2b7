"""Launch the tile kernels a few times at benchmark scale, for Nsight Compute:

    ncu --clock-control none -k regex:"knn_pass|knn_filter|knn_bound|mine_pass" --launch-skip 1 --launch-count 4 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 benchmarks/kernels_once.py

knn_vote at FER-2013 scale (3,589 x 28,709 x 512, k = 10) with the float32 filter path
(DNNRL_KNN_FILTER=1: knn_bound_kernel on the gallery subset, knn_filter_kernel, then the
exact knn_pass whose blocks return at once unless a query overflowed), then neither (the 3xTF32 pass, the default), then the candidate path
(DNNRL_KNN_CANDIDATES=1), then the fused loss forward at
B = 8192 in float32 and bfloat16.
"""
import os

import torch

import dnnrl_ext


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3589, 512, device="cuda", generator=g), dim=1)
    gal = torch.nn.functional.normalize(torch.randn(28709, 512, device="cuda", generator=g), dim=1)
    lab = torch.randint(0, 7, (28709,), device="cuda", generator=g)
    for var in ("DNNRL_KNN_FILTER", None, "DNNRL_KNN_CANDIDATES"):  # the newest first (ncu --launch-count)
        for v in ("DNNRL_KNN_EXACT", "DNNRL_KNN_CANDIDATES", "DNNRL_KNN_FILTER"):
            os.environ.pop(v, None)
        if var is not None:
            os.environ[var] = "1"
        for _ in range(2):
            dnnrl_ext.knn_vote(q, gal, lab, 10, 7)
    os.environ.pop("DNNRL_KNN_CANDIDATES", None)
    x = torch.nn.functional.normalize(torch.randn(8192, 512, device="cuda", generator=g), dim=1)
    y = torch.randint(0, 7, (8192,), device="cuda", generator=g)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for _ in range(2):
                dnnrl_ext.triplet_loss(x.to(dtype), y)
    torch.cuda.synchronize()
    print("kernels_once: done")


if __name__ == "__main__":
    main()
