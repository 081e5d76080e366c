"""MkDocs hooks for the mechscope site (listed under ``hooks:`` in ``mkdocs.yml``).

- **API pages from ``__all__``.** Every package of ``mechscope`` that defines ``__all__`` gets a
  reference page ``api/<package>.md`` holding ``::: <package>``; mkdocstrings renders exactly the
  names in ``__all__``. The pages are generated during the build and appended to the "API
  reference" section of the navigation, so a new subpackage is documented as soon as it exports
  something.
- **Every public name has a docstring.** A name in any ``__all__`` whose object has no docstring,
  or a public method or property of such a class without one (an override may inherit its base's),
  stops the build with the list of such names (`missing_docstrings`). There are no exemptions.
- **The benchmark page** is ``BENCHMARKS.md`` from the repository root, included as
  ``benchmarks.md``.
- **Quiet tutorial kernels.** The tutorials run in kernels without ipywidgets, where importing
  ``tqdm.auto`` (as mechscope and ``transformers`` do) warns that notebook progress bars fall back
  to text ones; `quiet_kernels` ignores that one warning in the kernels the build starts, so the
  pages show only what their cells print.
- **Pages that may not exist yet.** Navigation entries listed in ``OPTIONAL_PAGES`` are dropped
  when their file is absent (each one is logged); any other missing page stays a strict-mode error.

The top-level ``mechscope`` package imports most of its names lazily (on first attribute access),
which static analysis cannot follow; its page documents each name at its defining module, found
by importing it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import griffe
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.mechscope")

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
API_SECTION = "API reference"
OPTIONAL_PAGES = {
    "circuits.md",
    "subspace.md",
    "probing.md",
    "othello.md",
    "features.md",
    "tl_compat.md",
    "tutorials/tl_main_demo.py",
}

# tqdm's warning (``tqdm.notebook.WARN_NOIPYW``) when a kernel lacks ipywidgets: text progress
# bars work, and the warning is the same on every page.
KERNEL_WARNINGS = ("ignore:IProgress not found",)

_state: dict = {}


def _load() -> griffe.Module:
    return griffe.load("mechscope", search_paths=[str(SRC)], resolve_aliases=False)


def _public_packages(root: griffe.Module) -> dict[str, list[str]]:
    """Every package (``__init__`` module) under ``root`` that defines ``__all__``, with its names."""
    found = {}
    stack = [root]
    while stack:
        module = stack.pop()
        if module.is_init_module and module.exports:
            found[module.path] = [str(name) for name in module.exports]
        stack.extend(sub for sub in module.modules.values() if sub.is_init_module)
    return dict(sorted(found.items()))


def _defining_path(package: str, name: str) -> str:
    """Where a lazily exported name of ``package`` is defined, found by importing it."""
    obj = getattr(importlib.import_module(package), name)
    module = getattr(obj, "__module__", None) or package
    return f"{module}.{name}"


def _resolve(root: griffe.Module, path: str) -> griffe.Object | None:
    try:
        obj = root.modules_collection[path]
    except KeyError:
        return None
    while isinstance(obj, griffe.Alias):
        try:
            obj = obj.target
        except griffe.AliasResolutionError:
            return None
    return obj


def _page(package: str, names: list[str], root: griffe.Module) -> str:
    if package == "mechscope":
        lines = [
            "# `mechscope`",
            "",
            "The names of `import mechscope as ms`. Most are imported on first use, so `import mechscope`",
            "stays fast; each is documented where it is defined.",
            "",
        ]
        for name in names:
            path = f"mechscope.{name}"
            if _resolve(root, path) is None:
                path = _defining_path("mechscope", name)
            lines += [
                f"::: {path}",
                "    options:",
                "      show_root_heading: true",
                "      show_root_full_path: false",
                "",
            ]
        return "\n".join(lines)
    return f"# `{package}`\n\n::: {package}\n    options:\n      show_root_heading: false\n"


def _documented(obj: griffe.Object) -> bool:
    return bool(obj.docstring and obj.docstring.value.strip())


def _public_methods(cls: griffe.Class) -> list[str]:
    """The public methods and properties ``cls`` defines itself (not the inherited ones)."""
    return [
        name
        for name, member in cls.members.items()
        if not name.startswith("_") and not member.is_alias and (member.is_function or "property" in member.labels)
    ]


def _inherits_docstring(cls: griffe.Class, name: str) -> bool:
    """Whether a base class of ``cls`` (within the loaded packages) documents the method ``name``."""
    try:
        bases = cls.mro()
    except Exception:  # a base griffe cannot resolve (outside the loaded packages): nothing to inherit
        return False
    return any(
        name in base.members and not base.members[name].is_alias and _documented(base.members[name]) for base in bases
    )


def missing_docstrings(root: griffe.Module, packages: dict[str, list[str]]) -> list[str]:
    """Every public name without a docstring: each name in a package's ``__all__`` and each public
    method or property of a public class (an override may inherit its base's docstring).

    ``root`` is a package loaded with griffe; ``packages`` maps package paths to their
    ``__all__`` (`_public_packages`). A class exported by several packages is checked once.
    """
    missing, classes = [], set()
    for package, names in packages.items():
        for name in names:
            path = f"{package}.{name}"
            obj = _resolve(root, path)
            if obj is None and package == "mechscope":
                obj = _resolve(root, _defining_path(package, name))
            if obj is None:
                missing.append(f"{path} (not found)")
                continue
            if not _documented(obj):
                missing.append(path)
            if obj.is_class and obj.path not in classes:
                classes.add(obj.path)
                missing += [
                    f"{obj.path}.{method}"
                    for method in _public_methods(obj)
                    if not _documented(obj.members[method]) and not _inherits_docstring(obj, method)
                ]
    return missing


def _filter_nav(items: list, docs_dir: Path) -> list:
    """The navigation without entries for absent optional pages."""
    kept = []
    for item in items:
        title, target = next(iter(item.items())) if isinstance(item, dict) else (None, item)
        if isinstance(target, list):
            kept.append({title: _filter_nav(target, docs_dir)})
        elif isinstance(target, str) and target in OPTIONAL_PAGES and not (docs_dir / target).exists():
            log.info("navigation: %s is not written yet; left out", target)
        else:
            kept.append(item)
    return kept


def quiet_kernels(environ=os.environ) -> None:
    """Add `KERNEL_WARNINGS` to ``PYTHONWARNINGS`` in ``environ``, which the tutorial kernels inherit."""
    given = [option for option in environ.get("PYTHONWARNINGS", "").split(",") if option]
    environ["PYTHONWARNINGS"] = ",".join(given + [w for w in KERNEL_WARNINGS if w not in given])


def on_config(config):
    quiet_kernels()
    root = _load()
    packages = _public_packages(root)
    missing = missing_docstrings(root, packages)
    if missing:
        raise PluginError(
            "public names without a docstring (add one where each is defined):\n  " + "\n  ".join(missing)
        )
    _state.update(root=root, packages=packages)
    config.nav = _filter_nav(config.nav, Path(config.docs_dir))
    for item in config.nav:
        if isinstance(item, dict) and API_SECTION in item:
            section = item[API_SECTION]
            section += [{f"{package}": f"api/{package}.md"} for package in packages]
            break
    else:
        raise PluginError(f"mkdocs.yml: the navigation needs a section named {API_SECTION!r}")
    return config


def on_files(files, config):
    for package, names in _state["packages"].items():
        page = _page(package, names, _state["root"])
        files.append(File.generated(config, f"api/{package}.md", content=page))
    files.append(File.generated(config, "benchmarks.md", content=(ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")))
    return files
