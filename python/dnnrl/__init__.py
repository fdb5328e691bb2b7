"""dnnrl: the DNNRL facial-expression application (Guo et al., 2016) on top of dnnrl_ext.

Modules: model (Table 1 network), data (CSV / folder / archive readers + cache),
synthetic (built-in demo data), transforms (batched on-device augmentation),
samplers, train (the driver), evaluate, cli (``dnnrl train|eval|embed``).
"""
__version__ = "0.1.0"
