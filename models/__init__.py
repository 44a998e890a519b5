"""Model library: image-text matching models, their registry, and the retrieval losses.

No argparse, no paths, no printing here: the pipeline steps own all of that.
"""
from models.registry import create_model, model_names, register_model

__all__ = ["create_model", "model_names", "register_model"]
