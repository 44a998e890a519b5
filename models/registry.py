"""Create models by name. Adding an architecture: its file in models/, and a line here.

This module imports no model (nor torch): the workflow reads it when Snakemake starts, to know
which architectures can mine offline candidates.
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    path: str  # "module:class", imported on first use
    single_vector: bool  # one vector per image and caption: it can mine candidates (models/base.py)


ARCHITECTURES = {
    "vsepp": Architecture("models.vsepp:VSEPP", single_vector=True),
    "vsrn": Architecture("models.vsrn:VSRN", single_vector=True),
    "scan": Architecture("models.scan:SCAN", single_vector=False),
    "bfan": Architecture("models.bfan:BFAN", single_vector=False),
}


def model_names():
    return sorted(ARCHITECTURES)


def embedding_models():
    """The architectures that can mine offline candidates (one vector per item)."""
    return [name for name in model_names() if ARCHITECTURES[name].single_vector]


def model_class(name):
    """The class of architecture `name`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; registered: {model_names()}")
    module, cls = ARCHITECTURES[name].path.split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(name, **config):
    """Instantiate architecture `name` from keyword config (its config dataclass fields)."""
    cls = model_class(name)
    return cls(cls.config_class(**config))
