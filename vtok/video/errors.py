"""Argument errors of the video pipeline that read right both in Python and on the command line.

``ArgumentError("frames", 32, "the video has 10 frames; pass {frames}10 or fewer")`` reads
``frames=32: the video has 10 frames; pass frames=10 or fewer`` as a Python exception and, through
``e.for_cli({"frames": "--frames"})``, ``--frames 32: the video has 10 frames; pass --frames 10 or fewer``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from pathlib import Path


class _PythonNames(dict):
    """``{name}`` → ``name=`` (a keyword argument)."""

    def __missing__(self, name: str) -> str:
        return f"{name}="


class _FlagNames(dict):
    """``{name}`` → ``--flag `` from ``flags`` (Python's ``name=`` for a name without a flag)."""

    def __init__(self, flags: Mapping[str, str]) -> None:
        super().__init__({name: f"{flag} " for name, flag in flags.items()})

    def __missing__(self, name: str) -> str:
        return f"{name}="


def literal(text: str) -> str:
    """``text`` (e.g. a library's message) for an :class:`ArgumentError` detail: its braces kept as they are."""
    return text.replace("{", "{{").replace("}", "}}")


def _shell(value: object) -> str:
    return shlex.quote(str(value))


class ArgumentError(ValueError):
    """A bad argument, found before any work starts.

    Attributes:
        arg: the Python parameter at fault.
        value: the value it got.
        detail: what is wrong and what to pass instead; ``{name}`` stands for an argument (``name=`` in Python,
            ``--flag `` on the command line); wrap foreign text in :func:`literal`.
    """

    def __init__(self, arg: str, value: object, detail: str) -> None:
        self.arg, self.value, self.detail = arg, str(value) if isinstance(value, Path) else value, detail
        super().__init__(self._render(_PythonNames(), repr))

    def for_cli(self, flags: Mapping[str, str]) -> str:
        """The message naming command-line flags (``flags``: Python parameter → flag) instead of parameters."""
        return self._render(_FlagNames(flags), _shell)

    def renamed(self, old: str, new: str) -> ArgumentError:
        """The same error for a caller whose parameter ``old`` is called ``new``."""
        arg = new if self.arg == old else self.arg
        return ArgumentError(arg, self.value, self.detail.replace("{" + old + "}", "{" + new + "}"))

    def _render(self, names: dict, show: Callable[[object], str]) -> str:
        return f"{names[self.arg]}{show(self.value)}: {self.detail.format_map(names)}"
