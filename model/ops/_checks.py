"""Argument checks of the public op functions: a ValueError that names the function, the argument,
what was expected and what came, instead of an IndexError (or a silently wrong result) from
inside a kernel.

Shapes are patterns: ints must match exactly, names ("N", "K") must agree between the arguments
of one call, "..." stands for any leading dims. Under torch.export sizes can be symbolic; a
comparison between two symbolic sizes becomes torch._check (a runtime assert in the graph)
rather than a Python `if` that would guard on data-dependent sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Pattern = tuple[int | str, ...]


def _fmt(pattern: Pattern) -> str:
    inner = ", ".join(str(p) for p in pattern)
    return f"({inner},)" if len(pattern) == 1 else f"({inner})"


def _got(t: Tensor) -> str:
    return _fmt(tuple(t.shape)) if t.dim() else "() (a scalar)"


class ArgChecker:
    """Checks the tensor arguments of one call of `fn`, binding named dims across them."""

    def __init__(self, fn: str):
        self.fn = fn
        self.dims: dict[str, tuple[object, str]] = {}  # name -> (size, argument it came from)
        self.device: tuple[torch.device, str] | None = None

    def fail(self, msg: str) -> None:
        raise ValueError(f"{self.fn}: {msg}")

    def tensor(self, name: str, t, pattern: Pattern, *, kinds: str = "fi") -> Tensor:
        """t must be a Tensor of shape `pattern` whose dtype kind is in `kinds` (f floating,
        i integer), on the device of the previously checked arguments."""
        if not isinstance(t, Tensor):
            self.fail(f"{name} must be a Tensor of shape {_fmt(pattern)}, got {type(t).__name__}")
        self._shape(name, t, pattern)
        kind = "f" if t.is_floating_point() else ("i" if not t.is_complex() and t.dtype != torch.bool else "")
        if not kind or kind not in kinds:
            want = {"f": "a floating", "i": "an integer", "fi": "a floating or integer"}[kinds]
            self.fail(f"{name} must be {want} tensor, got {t.dtype}")
        if self.device is None:
            self.device = (t.device, name)
        elif t.device != self.device[0]:
            self.fail(f"{name} must be on the device of {self.device[1]} ({self.device[0]}), got {t.device}")
        return t

    def _shape(self, name: str, t: Tensor, pattern: Pattern) -> None:
        lead = pattern[0] == "..."
        fixed = pattern[1:] if lead else pattern
        if t.dim() < len(fixed) or (not lead and t.dim() != len(fixed)):
            self.fail(f"{name} must have shape {_fmt(pattern)}, got {_got(t)}")
        sizes = t.shape[t.dim() - len(fixed):]
        for want, size in zip(fixed, sizes, strict=True):
            if isinstance(want, int):
                if not _same(size, want):
                    self.fail(f"{name} must have shape {_fmt(pattern)}, got {_got(t)}")
            elif want in self.dims:
                bound, source = self.dims[want]
                msg = f"{self.fn}: {name} and {source} disagree on {want}"
                if not _same(size, bound, lambda msg=msg: msg):
                    self.fail(f"{name} must have shape {_fmt(pattern)} with {want} = {bound} "
                              f"from {source}, got {_got(t)}")
            else:
                self.dims[want] = (size, name)

    def output_size(self, name: str, size: Sequence[int]) -> None:
        if len(size) != 2 or any(int(s) < 1 for s in size):
            self.fail(f"{name} must be two positive ints (oh, ow), got {list(size)}")


def _same(a, b, msg=None) -> bool:
    """a == b for sizes; symbolic sizes are asserted (torch._check), never branched on."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    torch._check(a == b, msg or (lambda: f"size {a} != {b}"))
    return True
