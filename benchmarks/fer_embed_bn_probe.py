"""Probe (not part of the app): does centring the embedding before the L2
normalisation let the exp triplet loss learn on FER-2013?

The untrained network maps every image into a narrow cone (|mean embedding| ~0.98,
squared distances ~0.08), so triplet gradients, which scale with distances, are tiny.
This wraps the final linear layer as Linear -> BatchNorm1d(affine=False) and then
runs ``dnnrl.experiments`` with the given arguments. Usage: same arguments as
``python -m dnnrl.experiments``.
"""
import sys

import torch

import dnnrl.train as train_mod

_build = train_mod.build


def build_with_bn(cfg, num_classes, device):
    model = _build(cfg, num_classes, device)
    model.fc = torch.nn.Sequential(model.fc, torch.nn.BatchNorm1d(model.fc.out_features, affine=False)).to(device)
    return model


train_mod.build = build_with_bn

if __name__ == "__main__":
    from dnnrl.experiments import main
    main(sys.argv[1:])
