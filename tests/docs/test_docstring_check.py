"""The site build's docstring check (`docs/api/hooks.py`): it names every public name without a
docstring, so a strict build fails on it. Checked on a small package written for the test, and
on mechscope itself."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from tests.docs.blocks import ROOT

griffe = pytest.importorskip("griffe", reason="the docs extra is needed: pip install -e '.[docs]'")
pytest.importorskip("mkdocs", reason="the docs extra is needed: pip install -e '.[docs]'")

FAKE = {
    "__init__.py": '''
        """A package with public names, some undocumented."""

        from fakepkg.things import Base, Child, documented, undocumented

        __all__ = ["Base", "Child", "documented", "undocumented", "LIMIT"]

        LIMIT = 3
        """A documented constant."""
    ''',
    "things.py": '''
        """Things."""


        def documented():
            """Has a docstring."""


        def undocumented():
            return 1


        class Base:
            """A documented class."""

            def run(self):
                """Documented here, inherited by overrides."""

            def bare(self):
                return 2

            @property
            def size(self):
                return 3

            def _private(self):
                return 4


        class Child(Base):

            def run(self):
                return 5

            def fresh(self):
                return 6
    ''',
}


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("mechscope_docs_hooks", ROOT / "docs" / "api" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_names_every_undocumented_public_name(hooks, tmp_path):
    package = tmp_path / "fakepkg"
    package.mkdir()
    for name, text in FAKE.items():
        (package / name).write_text(textwrap.dedent(text).lstrip())
    root = griffe.load("fakepkg", search_paths=[str(tmp_path)], resolve_aliases=False)
    packages = hooks._public_packages(root)
    assert packages == {"fakepkg": ["Base", "Child", "documented", "undocumented", "LIMIT"]}
    assert hooks.missing_docstrings(root, packages) == [
        "fakepkg.things.Base.bare",  # a public method
        "fakepkg.things.Base.size",  # a public property
        "fakepkg.Child",  # a class in __all__
        "fakepkg.things.Child.fresh",  # a method of a subclass; its run() inherits Base.run's docstring
        "fakepkg.undocumented",  # a function in __all__
    ]


def test_mechscope_has_no_undocumented_public_name(hooks):
    root = hooks._load()
    missing = hooks.missing_docstrings(root, hooks._public_packages(root))
    assert missing == [], "public names without a docstring (the site build fails on them):\n" + "\n".join(missing)
