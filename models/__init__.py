"""Model library: image-text matching models, their registry, and the retrieval losses.

No argparse, no paths, no printing here: the pipeline steps own all of that. The math is here;
faster implementations of its hot spots live in accel/ and are called where they apply.
"""

__all__ = ["create_model", "model_names"]


def __getattr__(name):
    # Imported on first use, so that `models.variants` (the loss variants' table, which the
    # workflow reads when Snakemake starts) loads without torch.
    if name in __all__:
        from models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
