"""The source tree keeps its shape: no module uses another module's underscore names, only
the command line prints, and files stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mechscope"
SCREENS = PACKAGE / "cli"
MAX_LINES = 500
MAX_MODEL_LINES = 320


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str, root: Path) -> bool:
    """Whether ``dotted`` (``mechscope.x.y``) names a module or package under ``root``."""
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def private_uses(path: Path, root: Path = SRC) -> list[str]:
    """Cross-module uses of underscore names in ``path``: imports of them, and attribute access
    on an imported mechscope module (``module._name``). A private module (``_common.py``) may be
    imported within its own package."""
    module = module_name(path, root)
    package = package_of(module, path)
    where = path.relative_to(root)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> imported mechscope module

    def check_module(dotted: str, line: int) -> None:
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if is_private(part) and ".".join(parts[:i]) != package:
                found.append(f"{where}:{line}: imports private module {dotted}")
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "mechscope":
                    continue
                check_module(alias.name, node.lineno)
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules["mechscope"] = "mechscope"
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            if source.split(".")[0] != "mechscope":
                continue
            check_module(source, node.lineno)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if is_module(target, root):
                    check_module(target, node.lineno)
                    modules[alias.asname or alias.name] = target
                elif is_private(alias.name) and source != module:
                    found.append(f"{where}:{node.lineno}: imports {alias.name} from {source}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in modules:
            continue
        owner = modules[value.id]
        for part in reversed(chain[1:]):  # follow submodules: ms.model.transformer._x
            if not is_module(f"{owner}.{part}", root):
                break
            owner = f"{owner}.{part}"
        else:
            if owner != module:
                found.append(f"{where}:{node.lineno}: uses {owner}.{node.attr}")
    return found


# TransformerLens functions whose whole job is printing keep TransformerLens' behaviour in the
# compatibility namespace (same name, same meaning): its prompt report and its load message.
TL_PRINTING = {("mechscope/tl/utils.py", "test_prompt"), ("mechscope/tl/model.py", "from_pretrained")}


def prints(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = str(path.relative_to(root))
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (where, node.name) in TL_PRINTING:
            allowed.update(id(inner) for inner in ast.walk(node))
    return [
        f"{where}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
        and id(node) not in allowed
    ]


def test_no_module_uses_another_modules_private_names():
    offenders = [use for path in sources() for use in private_uses(path)]
    assert not offenders, "cross-module private names (make them public or move them):\n" + "\n".join(offenders)


def test_only_the_command_line_prints():
    offenders = [call for path in sources() if SCREENS not in path.parents for call in prints(path)]
    assert not offenders, "print calls outside mechscope/cli/ (return data; print in cli/):\n" + "\n".join(offenders)


def test_files_stay_short():
    model_file = PACKAGE / "model" / "transformer.py"
    model_lines = len(model_file.read_text().splitlines())
    assert model_lines <= MAX_MODEL_LINES, f"model/transformer.py has {model_lines} lines (at most {MAX_MODEL_LINES})"
    long = {
        str(path.relative_to(SRC)): n for path in sources() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them): {long}"


def test_the_scanner_finds_private_uses(tmp_path):
    package = tmp_path / "mechscope"
    (package / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/_shared.py", "other.py"):
        (package / name).write_text("")
    (package / "sub" / "fine.py").write_text(
        "from mechscope.sub._shared import helper\nfrom mechscope.sub.fine import _own\nfrom . import _shared\n"
    )
    (package / "bad.py").write_text(
        "import mechscope.sub.fine as fine\nfrom mechscope import other\nfrom mechscope.other import _hidden\n"
        "from mechscope.sub._shared import helper\nfine._x\nother._y\nobj._z\nfine.__doc__\nprint('no')\n"
        "import mechscope\nmechscope.sub.fine._w\n"
    )
    assert not private_uses(package / "sub" / "fine.py", tmp_path)
    assert [line.split(": ", 1)[1] for line in private_uses(package / "bad.py", tmp_path)] == [
        "imports _hidden from mechscope.other",
        "imports private module mechscope.sub._shared",
        "uses mechscope.sub.fine._x",
        "uses mechscope.other._y",
        "uses mechscope.sub.fine._w",
    ]
    assert prints(package / "bad.py", tmp_path) == ["mechscope/bad.py:9"]
