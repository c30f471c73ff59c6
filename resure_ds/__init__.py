"""resure-ds: ReSURE fine-tuning of chat models on multi-turn dialogue.

The package __init__ imports nothing heavy on purpose: `resure_ds.loss`,
`resure_ds.welford` and `resure_ds.weighting` must import without DeepSpeed.
"""

__version__ = "0.1.0"
