"""Model library: image-text matching models, their registry, and the retrieval losses.

No argparse, no paths, no printing here: the pipeline steps own all of that. The math is here;
faster implementations of its hot spots live in accel/ and are called where they apply.
"""

from models.registry import create_model, model_names

__all__ = ["create_model", "model_names"]
