"""The user's own code: importing ``"module:callable"`` factories, calling them, and the
import path a job's code is found on.

A job names code as ``"package.module:attribute"`` (``model.factory``, ``data.factory``).
:func:`import_factory` imports it and :func:`call_factory` calls it; every failure becomes a
:class:`UserCodeError` whose message names the spec field, the module or factory, the
exception it raised and, for a module that cannot be found, the paths searched.

:func:`code_paths` lists the folders a job's code is imported from (the spec's folder, the
current directory, the parents of ``code.py_modules``); :func:`add_import_paths` puts them
on ``sys.path``. The command line does that for ``run``, ``validate`` and ``inspect``, and
every Ray trial does it again in its worker.

Imports only the standard library.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "UserCodeError",
    "add_import_paths",
    "call_factory",
    "code_paths",
    "describe_error",
    "import_factory",
    "split_path",
]


class UserCodeError(ValueError):
    """The user's code cannot be imported or called, or returned something unusable. The
    message starts with the spec field it comes from (``model.factory: ...``)."""


def split_path(path: str) -> tuple[str, str]:
    """``"pkg.mod:attr.sub"`` -> ``("pkg.mod", "attr.sub")``; ValueError without a ``:``."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected 'module:callable' such as 'my_pkg.nets:build_net', "
                         f"got {path!r}")
    return module, attr


def import_factory(path: str, field: str) -> Callable[..., Any]:
    """The callable ``path`` (``"module:attribute"``, the attribute may be dotted) names.

    Raises UserCodeError, its message starting with ``field``, when the module cannot be
    found (the paths searched are listed), importing it raises, the attribute is missing
    (the module's public names are listed) or is not callable.
    """
    try:
        module_name, attr = split_path(path)
    except ValueError as err:
        raise UserCodeError(f"{field}: {err}") from None
    module = _import_module(module_name, field)
    value: Any = module
    for depth, part in enumerate(attr.split(".")):
        if not hasattr(value, part):
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attr.split('.')[:depth])}"
            raise UserCodeError(f"{field}: {owner} ({_origin(module)}) has no attribute "
                                f"{part!r}{_suggest(part, value)}")
        value = getattr(value, part)
    if not callable(value):
        raise UserCodeError(f"{field}: {path} is a {type(value).__name__}, not a callable; "
                            "name a function or class that builds it")
    return value


def _import_module(name: str, field: str) -> Any:
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if missing and (name == missing or name.startswith(missing + ".")):
            raise UserCodeError(
                f"{field}: cannot import module {name!r} ({type(err).__name__}: {err}); "
                f"searched: {_searched()}; put the module in the job spec's folder or the "
                "current directory, or install it") from None
        raise UserCodeError(f"{field}: importing module {name!r} failed: "
                            f"{describe_error(err)}") from None
    except Exception as err:  # the user's module raised while being imported
        raise UserCodeError(f"{field}: importing module {name!r} failed: "
                            f"{describe_error(err)}") from None


def _searched() -> str:
    return ", ".join(dict.fromkeys(entry or os.getcwd() for entry in sys.path))


def _origin(module: Any) -> str:
    return getattr(module, "__file__", None) or "no file"


def _suggest(name: str, owner: Any) -> str:
    public = sorted(n for n in dir(owner) if not n.startswith("_"))
    close = difflib.get_close_matches(name, public, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    shown = ", ".join(public[:12]) + (", ..." if len(public) > 12 else "")
    return f"{hint}; it defines: {shown or 'nothing public'}"


def describe_error(err: BaseException) -> str:
    """``Type: message (at file:line)`` of an exception, the line being its innermost frame
    outside torch and ticketsearch (the user's line, when there is one)."""
    skipped = tuple(str(Path(module.__file__).parent) + os.sep
                    for module in (sys.modules.get("torch"), sys.modules.get("ticketsearch"))
                    if module is not None and getattr(module, "__file__", None))
    frames = [frame for frame in traceback.extract_tb(err.__traceback__)
              if not frame.filename.startswith(skipped)]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def accepted_keywords(fn: Callable[..., Any], names: Iterable[str]) -> list[str]:
    """Those of ``names`` that ``fn`` accepts as keyword arguments (all of them when it takes
    ``**kwargs``; none when its signature cannot be read)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return list(names)
    keyword = {p.name for p in parameters
               if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             inspect.Parameter.KEYWORD_ONLY)}
    return [name for name in names if name in keyword]


def call_factory(fn: Callable[..., Any], field: str, path: str, kwargs: Mapping[str, Any],
                 provided: Mapping[str, Any] | None = None) -> Any:
    """``fn(**provided_it_accepts, **kwargs)``: each entry of ``provided`` (e.g.
    ``num_classes``, ``input_shape``) is passed when ``fn``'s signature accepts that keyword.

    Raises UserCodeError naming ``field`` and ``path`` when ``kwargs`` repeats a provided
    name or the call raises (its exception and the line it came from are shown).
    """
    provided = dict(provided or {})
    clash = sorted(set(kwargs) & set(provided))
    if clash:
        kwargs_field = field.rsplit(".", 1)[0] + ".kwargs"
        raise UserCodeError(f"{kwargs_field}: {', '.join(clash)} is passed by ticketsearch "
                            "(from the data); remove it from the kwargs")
    given = {name: provided[name] for name in accepted_keywords(fn, provided)}
    try:
        return fn(**given, **dict(kwargs))
    except Exception as err:
        args = ", ".join(f"{k}={v!r}" for k, v in {**given, **dict(kwargs)}.items())
        raise UserCodeError(f"{field}: {path}({args}) raised {describe_error(err)}") from None


def code_paths(spec_path: str | Path | None, py_modules: Sequence[str] = ()) -> list[str]:
    """The folders a job's code is imported from, absolute, without repeats: the folder of
    the spec file (when given), the current directory, and the folder holding each of
    ``py_modules`` (paths relative to the spec's folder; missing ones are skipped)."""
    base = Path(spec_path).resolve().parent if spec_path is not None else Path.cwd()
    folders = [base, Path.cwd().resolve()]
    for entry in py_modules:
        path = (base / entry).resolve()
        if path.exists():
            folders.append(path.parent)
    return list(dict.fromkeys(str(folder) for folder in folders))


def add_import_paths(paths: Iterable[str]) -> None:
    """Put each folder of ``paths`` at the front of ``sys.path`` unless it is already on it
    (as running a script puts its own folder there)."""
    for path in reversed(list(paths)):
        if path not in sys.path:
            sys.path.insert(0, path)
    importlib.invalidate_caches()
