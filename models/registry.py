"""Create models by name. Adding an architecture: its file in models/, and a line here."""

import importlib

# arch name -> "module:class". Modules are imported on first use, and import nothing from here.
ARCHITECTURES = {
    "vsepp": "models.vsepp:VSEPP",
    "vsrn": "models.vsrn:VSRN",
    "scan": "models.scan:SCAN",
    "bfan": "models.bfan:BFAN",
}


def model_names():
    return sorted(ARCHITECTURES)


def model_class(name):
    """The class of architecture `name`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; registered: {model_names()}")
    module, cls = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_model(name, **config):
    """Instantiate architecture `name` from keyword config (its config dataclass fields)."""
    cls = model_class(name)
    return cls(cls.config_class(**config))
