"""The SAE architecture registry: architecture name -> SAE class.

An architecture is one class registered with `register_sae`. The class carries everything
that differs between architectures: its config class (the architecture's knobs and their
validation, see `mechscope.sae.config`), its encoder and losses, and its mapping to the SAELens
file layout (`SAE.to_saelens`, `SAE.from_saelens`). Nothing else names an architecture, so a
new one is one file, or one class in a user's own module.

Example:
    >>> from mechscope.sae import SAE
    >>> from mechscope.sae.architectures.standard import StandardSAE
    >>> sae_class("standard") is StandardSAE
    True
    >>> {"standard", "gated", "topk", "batchtopk", "jumprelu"} <= set(registered_architectures())
    True
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from mechscope.errors import ConfigError

SAE_REGISTRY: dict[str, Any] = {}
"""Every registered architecture: name -> SAE class."""


def register_sae(name: str):
    """Class decorator registering an SAE architecture under ``name``.

    The class's ``config_class`` (a dataclass subclass of `SAEConfig` holding the architecture's
    knobs) must belong to it alone; a class that declares none gets an empty one. Registering a
    name twice with different classes is an error.

    Example:
        >>> from mechscope.sae import SAE
        >>> @register_sae("doc_relu")
        ... class DocReLU(SAE):
        ...     def encode_pre_and_acts(self, x):
        ...         pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        ...         return pre, self.hook_sae_acts_post(torch.relu(pre))
        >>> DocReLU.architecture, DocReLU.config_class.__name__
        ('doc_relu', 'DocReLUConfig')
        >>> del SAE_REGISTRY["doc_relu"]
    """

    def decorate(cls):
        from mechscope.sae.config import SAEConfig

        known = SAE_REGISTRY.get(name)
        if known is not None and _qualified(known) != _qualified(cls):
            raise ConfigError(
                f"SAE architecture {name!r} is already registered by {_qualified(known)}; choose another name"
            )
        config = cls.__dict__.get("config_class")
        if config is None:
            # [the inherited config class belongs to another architecture]
            config = dataclasses.make_dataclass(f"{cls.__name__}Config", [], bases=(cls.config_class,))
            config.__module__ = cls.__module__
            cls.config_class = config
        if not (isinstance(config, type) and issubclass(config, SAEConfig) and dataclasses.is_dataclass(config)):
            raise ConfigError(
                f"{_qualified(cls)}.config_class must be a dataclass subclass of SAEConfig, got {config!r}"
            )
        for other_name, other in SAE_REGISTRY.items():
            if other_name != name and other.config_class is config:
                raise ConfigError(
                    f"{config.__name__} already configures architecture {other_name!r}; "
                    f"give {cls.__name__} its own config class"
                )
        cls.architecture = name
        SAE_REGISTRY[name] = cls
        return cls

    return decorate


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_architectures() -> tuple[str, ...]:
    """The names of every registered architecture, sorted.

    Example:
        >>> "topk" in registered_architectures()
        True
    """
    _load_builtin()
    return tuple(sorted(SAE_REGISTRY))


def sae_class(name: str):
    """The SAE class registered as ``name``; a `ConfigError` names the nearest registered one.

    Example:
        >>> sae_class("topk").__name__
        'TopKSAE'
        >>> sae_class("top_k")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.ConfigError: unknown SAE architecture 'top_k'; did you mean 'topk'? Registered: [...]
    """
    _load_builtin()
    if name not in SAE_REGISTRY:
        near = difflib.get_close_matches(str(name), SAE_REGISTRY, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ";"
        raise ConfigError(f"unknown SAE architecture {name!r}{hint} Registered: {sorted(SAE_REGISTRY)}")
    return SAE_REGISTRY[name]


def _load_builtin() -> None:
    import mechscope.sae.architectures  # noqa: F401  (registers the built-in architectures)
