"""Fixtures for registry tests: fake plugin distributions on sys.path and the CLI in-process."""

from __future__ import annotations

import itertools
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmforge.cli import main
from llmforge.registry.manager import reset_registry

_counter = itertools.count()


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Install a throwaway plugin distribution: a module plus `*.dist-info/entry_points.txt` on sys.path.

    Returns the module name (unique per call, so sys.modules never serves a stale one).
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, version: str, source: str) -> str:
        module = f"fake_llmforge_plugin_{next(_counter)}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[llmforge]\n{dist} = {module}\n")
        return module

    return make


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `llmforge ARGS` in-process with a fresh registry; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        reset_registry()
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return code, out, err

    return run
