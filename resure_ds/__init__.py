"""resure-ds: ReSURE fine-tuning of chat models on multi-turn dialogue.

The package __init__ imports nothing heavy on purpose: `resure_ds.stats`
and the data loader must import without DeepSpeed (tests/test_imports.py).
"""

__version__ = "0.1.0"
