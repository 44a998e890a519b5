"""Create models by name. A model module registers its class with `@register_model`."""
_REGISTRY = {}


def register_model(cls):
    """Class decorator: make `cls` creatable as `create_model(cls.name, **config)`."""
    _REGISTRY[cls.name] = cls
    return cls


def model_class(name):
    """The registered class of model `name`."""
    _load_builtin_models()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create_model(name, **config):
    """Instantiate the registered model `name` from keyword config (its config dataclass fields)."""
    cls = model_class(name)
    return cls(cls.config_class(**config))


def _load_builtin_models():
    # Imported here, not at module top, so `models.registry` has no import cycle with the models.
    import models.vsepp  # noqa: F401
    import models.scan  # noqa: F401
    import models.bfan  # noqa: F401
    import models.vsrn  # noqa: F401


def model_names():
    _load_builtin_models()
    return sorted(_REGISTRY)
