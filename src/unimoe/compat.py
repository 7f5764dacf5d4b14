"""Differences between the transformers releases ``pyproject.toml`` allows, handled here and nowhere else.

transformers 5.24 renamed the key/value cache from ``past_key_values`` to ``cache``: in model and
attention keyword arguments, in the mask functions, in ``generate``'s model inputs and in the fields of
``ModelOutput`` (whose constructor now rewrites ``past_key_values=`` to ``cache=``). Earlier releases
know only ``past_key_values``.

unimoe's own API names it ``cache`` on every release: model ``forward`` takes ``cache=`` (and
``past_key_values=``, the name older ``generate`` passes), outputs expose ``.cache``. Calls into
transformers go through :func:`cache_kwargs`, outputs are declared with :func:`model_output`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from transformers.generation.utils import ALL_CACHE_NAMES

#: The keyword the installed transformers uses for the KV cache: ``"cache"`` from 5.24 on,
#: ``"past_key_values"`` before (transformers' ``ALL_CACHE_NAMES`` lists its default first).
CACHE_NAME: str = ALL_CACHE_NAMES[0]
LEGACY_CACHE_NAME = "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call into transformers, under the installed release's keyword."""
    return {CACHE_NAME: cache}


def pop_cache(cache: Any, kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed as ``cache=`` or as ``past_key_values=`` (removed from ``kwargs``), so
    that neither name falls through ``**kwargs`` unseen. Raises if both name different objects."""
    legacy = kwargs.pop(LEGACY_CACHE_NAME, None)
    if legacy is None:
        return cache
    if cache is not None and cache is not legacy:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return legacy


def model_output(cls: type) -> type:
    """``@dataclass`` for a ``ModelOutput`` subclass that declares a ``cache`` field.

    On releases before 5.24 the field is stored as ``past_key_values`` (where ``generate`` looks for
    it), and ``.cache`` / ``cache=`` are aliases of it, so code reads and builds outputs the same way on
    every release.
    """
    name = CACHE_NAME
    if name != "cache":
        cls.__annotations__ = {(name if k == "cache" else k): v for k, v in cls.__annotations__.items()}
        setattr(cls, name, cls.__dict__.get("cache"))
        delattr(cls, "cache")
    cls = dataclasses.dataclass(cls)
    if name == "cache":
        return cls
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "cache" in kwargs:
            if name in kwargs:
                raise ValueError(f"pass the KV cache as `cache` or as `{name}`, not both")
            kwargs[name] = kwargs.pop("cache")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.cache = property(lambda self: getattr(self, name))
    return cls


def enable_activation_checkpointing(model: Any, checkpointing_kwargs: dict[str, Any] | None = None) -> None:
    """Activation (gradient) checkpointing on a transformers model: ``activation_checkpointing_enable``
    from 5.23 on, ``gradient_checkpointing_enable`` (deprecated since) before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(checkpointing_kwargs)
