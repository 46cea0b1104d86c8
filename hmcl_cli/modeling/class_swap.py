"""Give an object a run-time subclass of its own class, and its own class back.

hmcl changes how some modules of a loaded model compute (:mod:`hmcl_cli.modeling.fused_norms`,
:mod:`hmcl_cli.modeling.fused_rotary`, :mod:`hmcl_cli.modeling.fused_projections`) by swapping the
instance's class for a subclass that overrides ``forward``, made once per class. Each restores
only the classes it made (:func:`made_by`). Not an instance attribute: transformers >= 5.2x
re-applies its hub kernels at every ``train()`` / ``eval()`` switch, which deletes a forward set on
an instance and leaves a class's. ``isinstance`` checks, parameter names and ``state_dict`` are
unchanged, and :func:`restore` gives each object its own class back.

Each user keeps its own pickling (``__reduce_ex__`` in ``attrs``): a run-time subclass cannot be
found by name, and how the object is rebuilt depends on what its own class is.
"""

from __future__ import annotations

from typing import Iterable

BASE = "_hmcl_unfused_class"  # on a swapped-in subclass: the class it replaces


def own_class(obj: object) -> type:
    """``obj``'s class as its model defines it (the class a swapped-in subclass replaces)."""
    return type(obj).__dict__.get(BASE, type(obj))


def subclass(cache: dict, cls: type, name: str, attrs: dict) -> type:
    """The subclass of ``cls`` called ``name`` with ``attrs`` (``forward``, ``__reduce_ex__``, ...),
    made once per ``cls`` and kept in ``cache``."""
    if cls not in cache:
        cache[cls] = type(name, (cls,), {**attrs, BASE: cls})
    return cache[cls]


def made_by(cache: dict, objects: Iterable[object]) -> list:
    """The objects among ``objects`` that run a subclass from ``cache`` (one user's swaps; another
    user's swapped objects left out)."""
    made = set(cache.values())
    return [obj for obj in objects if type(obj) in made]


def is_swapped(obj: object) -> bool:
    """Whether ``obj`` runs a swapped-in subclass."""
    return own_class(obj) is not type(obj)


def restore(objects: Iterable[object]) -> int:
    """Give every swapped object among ``objects`` its own class back; returns how many."""
    n = 0
    for obj in objects:
        if is_swapped(obj):
            obj.__class__ = own_class(obj)
            n += 1
    return n
