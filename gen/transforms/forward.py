"""The one way a transform replaces a model's `forward`: a stack of wrappers, removed in the reverse order.

`wrap_forward(model, name, make)` installs `make(inner)` as `model.forward`, where `inner` is the forward it
replaces (the class's own, or the wrapper below); `unwrap_forward(model, name)` removes it again and refuses when
another wrapper sits above it (undo in the reverse order of apply). The wrappers live in the instance's `__dict__`,
so parameters, module names and the state_dict never change.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

_STACK = "_forward_wrappers"  # instance attribute: [(name, the forward that wrapper replaced), ...], bottom first


def wrapper_names(model: nn.Module) -> list[str]:
    """The forward wrappers on `model`, innermost first."""
    return [name for name, _ in model.__dict__.get(_STACK, [])]


def forward_wrapper(model: nn.Module, name: str) -> Callable | None:
    """The installed `name` wrapper of `model`, or None."""
    stack = model.__dict__.get(_STACK, [])
    wrappers = [inner for _, inner in stack[1:]] + ([model.forward] if stack else [])  # each wrapper, innermost first
    return next((w for (n, _), w in zip(stack, wrappers) if n == name), None)


def wrap_forward(model: nn.Module, name: str, make: Callable[[Callable], Callable]) -> Callable:
    """Install `make(model.forward)` as the model's forward under `name`; returns the installed wrapper."""
    if name in wrapper_names(model):
        raise RuntimeError(f"{type(model).__name__} already has a {name!r} forward wrapper")
    inner = model.forward
    outer = make(inner)
    model.__dict__.setdefault(_STACK, []).append((name, inner))
    model.__dict__["forward"] = outer
    return outer


def unwrap_forward(model: nn.Module, name: str) -> None:
    """Remove the `name` wrapper, which must be the outermost one."""
    stack = model.__dict__.get(_STACK, [])
    if not stack or stack[-1][0] != name:
        raise RuntimeError(f"cannot remove the {name!r} forward wrapper of {type(model).__name__}: the wrappers are "
                           f"{wrapper_names(model)} (innermost first); remove the outer ones first")
    _, inner = stack.pop()
    if stack:
        model.__dict__["forward"] = inner
    else:  # back to the class's own forward
        model.__dict__.pop("forward", None)
        model.__dict__.pop(_STACK, None)
