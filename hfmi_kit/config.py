"""Dataclass configs that serialise to JSON and check the types of what they are given.

Notebook parameters and CLI flags map onto these dataclasses through :func:`from_dict`, which
rejects unknown keys and wrongly typed values with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hfmi_kit.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return a JSON-serialisable dict of a dataclass instance (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _check(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _check(name, value, a)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {tp}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected None, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and Ellipsis not in args:  # tuple[int, int]: one type per position
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {value!r}")
            return tuple(_check(f"{name}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_check(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{name}: expected a path, got {value!r}")
        return Path(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None = None, **overrides: Any) -> T:
    """Build dataclass ``cls`` from ``data`` and ``overrides``, checking each value's type.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type, naming the field.
    """
    merged = dict(data or {})
    merged.update(overrides)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}"
        )
    kwargs = {k: _check(f"{cls.__name__}.{k}", v, hints[k]) for k, v in merged.items()}
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Opt:
    """What a task option means and which values it takes, beside its type. It sits in the
    option's annotation, the one place the option is declared::

        steps: Annotated[int, Opt("optimiser steps", low=1)] = 300

    The CLI shows ``help`` (``hfmi options DOMAIN COMMAND``), and every call of the task (CLI,
    notebook, Python) is checked against the range: :func:`typed`.
    """

    help: str = ""
    low: float | None = None  # smallest value allowed
    above: float | None = None  # values must be greater than this
    high: float | None = None  # largest value allowed
    choices: tuple[Any, ...] = ()

    def allowed(self, integer: bool = False) -> str:
        """``be an integer >= 1``, ``lie in (0, 1]``, ``be one of full, frozen``: the phrase after
        "must" (``integer``: the option takes integers)."""
        if self.choices:
            return "be one of " + ", ".join(map(str, self.choices))
        lo = f"[{self.low:g}" if self.low is not None else f"({self.above:g}" if self.above is not None else ""
        if lo and self.high is not None:
            return f"lie in {lo}, {self.high:g}]"
        if self.low is not None:
            return f"be {'an integer' if integer else 'a number'} >= {self.low:g}"
        if self.above is not None:
            return f"be a finite number > {self.above:g}"
        return f"be a number <= {self.high:g}" if self.high is not None else ""

    def check(self, flag: str, value: Any) -> None:
        """Raise :class:`ConfigError` (``--steps must be an integer >= 1, got 0``) for a value out
        of range; None (unset) and non-numbers other than ``choices`` pass."""
        import math

        if value is None:
            return
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{flag} must {self.allowed()}, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return
        bad = ((isinstance(value, float) and not math.isfinite(value))
               or (self.low is not None and value < self.low) or (self.above is not None and value <= self.above)
               or (self.high is not None and value > self.high))
        if bad:
            rule = self.allowed(integer=isinstance(value, int))
            raise ConfigError(f"{flag} must {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TaskOption:
    """One keyword option of a task function: its name, type (the annotation), default, and
    what its :class:`Opt` says (help and range)."""

    name: str
    type: Any
    default: Any = dataclasses.field(default=None)
    required: bool = False
    opt: Opt = Opt()

    @property
    def flag(self) -> str:
        """The command-line spelling (``--label-fraction``; the parent checkpoint is ``--from``)."""
        return "--from" if self.name == "ckpt" else "--" + self.name.replace("_", "-")

    @property
    def help(self) -> str:
        return self.opt.help

    def describe(self) -> str:
        """``--label-fraction (float, default 1.0): share of the labelled pool; must lie in (0, 1]``."""
        tp = getattr(self.type, "__name__", None) or str(self.type)
        for long, short in (("typing.", ""), ("pathlib.", ""), ("collections.abc.", "")):
            tp = tp.replace(long, short)
        head = f"{self.flag} ({tp}, " + ("required)" if self.required else f"default {self.default!r})")
        integer = self.type is int or int in typing.get_args(self.type)
        rule = self.opt.allowed(integer)
        text = "; ".join(t for t in (self.opt.help, f"must {rule}" if rule else "") if t)
        return f"{head}: {text}" if text else head

    def check(self, value: Any) -> Any:
        """``value`` of this option's type (converted as :func:`from_dict` does) and in its range.

        Raises:
            ConfigError: naming the flag.
        """
        value = _check(self.flag, value, self.type)
        self.opt.check(self.flag, value)
        return value


def takes_list(tp: Any) -> bool:
    """Whether an option of type ``tp`` holds a list (``Sequence[float] | None``, ``list[str]``)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(typing.get_origin(a) in (list, Sequence) for a in args)  # not a fixed-size tuple


def task_options(fn: Any) -> dict[str, TaskOption]:
    """The typed options of a task function: its keyword-only parameters, with the types of its
    annotations, their :class:`Opt` (from ``Annotated[type, Opt(...)]``) and its defaults. A
    domain's task signature is the one declaration of its options: the CLI checks flags against
    it, :func:`check_options` and :func:`typed` check values."""
    import inspect

    fn = inspect.unwrap(fn)
    hints = typing.get_type_hints(fn)
    extras = typing.get_type_hints(fn, include_extras=True)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        meta = getattr(extras.get(name), "__metadata__", ())
        opt = next((m for m in meta if isinstance(m, Opt)), Opt())
        out[name] = TaskOption(name, hints.get(name, Any), None if p.default is p.empty else p.default,
                               p.default is p.empty, opt)
    return out


def check_options(options: dict[str, TaskOption], given: dict[str, Any], *, what: str) -> dict[str, Any]:
    """``given`` checked against ``options``: every name known, every value of its type and in
    its range.

    Raises:
        ConfigError: ``--head is not an option of climate finetune (its options: ...)``, or the
            flag and the expected type or range of a wrong value.
    """
    out = {}
    for name, value in given.items():
        opt = options.get(name)
        if opt is None:
            known = ", ".join(o.flag for o in options.values() if o.name not in ("out", "ckpt", "data", "progress"))
            raise ConfigError(f"--{name.replace('_', '-')} is not an option of {what} (its options: {known})")
        out[name] = opt.check(value)
    return out


def option_checker(fn: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A function that checks a call's keywords against ``fn``'s typed options (read once, at the
    first call) and returns them converted; names that are not options pass unchanged (the call
    itself refuses them)."""
    options: dict[str, TaskOption] = {}

    def check(kw: dict[str, Any]) -> dict[str, Any]:
        if not options:
            options.update(task_options(fn))
        return {k: options[k].check(v) if k in options else v for k, v in kw.items()}

    return check


def typed(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a keyword-only task function so that every call is checked against its typed
    options (:func:`task_options`) before it runs: a wrong type or a value out of range is one
    :class:`ConfigError` naming the flag, whoever called (CLI, notebook, Python). (A domain's
    ``pretrain`` and ``finetune`` get this from :func:`hfmi_kit.train.provenance.recorded`.)"""
    import functools

    check = option_checker(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> T:
        return fn(*args, **check(kw))

    return run


def umask() -> int:
    """The process's file-creation mask, read without changing it where ``/proc`` allows."""
    import os

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def as_created(path: str | Path) -> None:
    """Give ``path`` (a folder: and everything in it) the mode a plain ``open``/``mkdir`` would
    have, what the user's umask allows: the temporary files and folders atomic writes go through
    are private to their owner (0600, 0700), and results on a shared project directory must be
    readable by the group as any other file the user writes."""
    import os

    path = Path(path)
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written, and
    with the mode of a plainly written file (:func:`as_created`)."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_into_place(tmp: str | Path, path: str | Path) -> Path:
    """Put the finished file or folder ``tmp`` at ``path`` by renames on one file system: an
    existing ``path`` is renamed aside first and removed only once ``tmp`` is in its place."""
    import os
    import shutil

    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def parse_param(text: str) -> Any:
    """A notebook parameter from the command line: YAML (numbers, lists, dicts, strings), with
    ``1e-3``-style numbers read as floats (YAML 1.1 would keep them strings) and ``500,850`` as a
    list of numbers."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        if "," in value:  # 500,850: a list of numbers, as the comma-separated flags read
            try:
                return [int(x) if x.strip().lstrip("+-").isdigit() else float(x) for x in value.split(",")]
            except ValueError:
                return value
    return value


def json_kind(x: Any) -> str:
    """How JSON names the type of ``x`` ("an object", "a list", ...), for error messages."""
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(x), type(x).__name__)


def read_json_object(path: str | Path, *, error: type[Exception] = ConfigError, expected: str = "a JSON object",
                     invalid: str = "invalid JSON") -> dict[str, Any]:
    """The JSON object in file ``path``.

    Raises:
        ``error``: naming the file: unreadable, not JSON (``invalid``), or not an object
            (``expected`` says what should be there).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: {invalid} ({e})") from e
    if not isinstance(doc, dict):
        raise error(f"{path}: expected {expected}, got {json_kind(doc)}")
    return doc
