"""quantcal: post-training static quantization for transformer language models.

The core package holds what every stage shares: the CLI, configs and the run directory,
the format vocabulary and quantization math, and model loading. The stages live in
``quantcal.calibrate``, ``quantcal.export`` and ``quantcal.evaluate``.
"""

__version__ = "0.1.0"
