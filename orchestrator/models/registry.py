"""A tiny timm-style model registry: ``@register_model`` factories, looked up by name.

Each variant is a small factory function. Its signature is the source of truth for what the
variant accepts: ``num_classes`` (whose default is the variant's default class count) plus
keyword-only options. ``create_model`` checks the options against that signature so that a
typo fails loudly with the net's name and the options it does take.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from orchestrator.errors import UsageError

if TYPE_CHECKING:  # torch only where a net is built or walked: a driver checks specs without it
    from torch import nn

__all__ = [
    "UnknownModelError",
    "check_model",
    "count_parameters",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]

Family = Literal["imagenet", "cifar"]
BlockKind = Literal["basic", "bottleneck"]
Factory = TypeVar("Factory", bound=Callable[..., "nn.Module"])


class UnknownModelError(UsageError, KeyError, ValueError):
    """Raised for a name that is not registered; callers may catch KeyError or ValueError."""

    def __str__(self) -> str:
        # KeyError would repr() the message, wrapping it in quotes.
        return str(self.args[0])


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    family: Family
    depth: int
    block: BlockKind
    residual: bool
    input_size: int
    num_classes: int
    options: dict[str, Any]  # option name -> default, in signature order


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    *, family: Family, depth: int, block: BlockKind, residual: bool, input_size: int
) -> Callable[[Factory], Factory]:
    """Register a factory under its function name, with the facts ``model_info`` reports."""

    def decorator(factory: Factory) -> Factory:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        params = inspect.signature(factory).parameters
        options = {
            p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        _REGISTRY[name] = _Entry(
            factory=factory,
            family=family,
            depth=depth,
            block=block,
            residual=residual,
            input_size=input_size,
            num_classes=params["num_classes"].default,
            options=options,
        )
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names, in registration order (ImageNet nets first, then CIFAR)."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint}; valid names: {', '.join(_REGISTRY)}"
        ) from None


def check_model(name: str, num_classes: int | None = None, **options: Any) -> None:
    """What ``create_model`` checks before it builds anything, without torch: the name is
    registered, the variant takes every option, ``num_classes`` is at least 1.

    Raises ``UnknownModelError``, ``TypeError`` (an option the variant does not take) or
    ``ValueError`` (num_classes).
    """
    entry = _entry(name)
    for option in options:
        if option not in entry.options:
            takes = ", ".join(entry.options) or "no options"
            raise TypeError(f"{name} does not take option {option!r}; it takes: {takes}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (got {num_classes})")


def create_model(name: str, num_classes: int | None = None, **options: Any) -> nn.Module:
    """Build a registered model; ``num_classes=None`` keeps the variant's default.

    Raises ``UnknownModelError`` for an unknown name and ``TypeError`` for an option the
    variant does not take (``check_model``); bad option values raise ``ValueError`` from the
    model itself.
    """
    check_model(name, num_classes, **options)
    if num_classes is not None:
        options["num_classes"] = num_classes
    return _entry(name).factory(**options)


def model_info(name: str) -> dict[str, Any]:
    """Describe a registered model without building it.

    Keys: name, family ("imagenet" | "cifar"), depth, block ("basic" | "bottleneck"),
    residual (False for plain nets), num_classes and input_size (the defaults: 1000/224
    for ImageNet, 10/32 for CIFAR), options (option name -> default).
    """
    entry = _entry(name)
    return {
        "name": name,
        "family": entry.family,
        "depth": entry.depth,
        "block": entry.block,
        "residual": entry.residual,
        "num_classes": entry.num_classes,
        "input_size": entry.input_size,
        "options": dict(entry.options),
    }


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (BN running statistics are buffers, so not counted).

    With all parameters this is the count the paper and torchvision report.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain net under DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`)."""
    from torch import nn

    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
