"""Finding input files: `**` globs, pruned excludes, and errors that name the pattern."""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

import pytest

from llmforge.data import files as files_mod
from llmforge.data.errors import ErrorPolicy
from llmforge.data.files import describe_file_changes, fingerprint_files, glob_regex, resolve_files
from llmforge.spec.errors import UserError


def _tree(root: Path) -> None:
    for rel in ["a.py", "pkg/b.py", "pkg/deep/c.py", "pkg/notes.txt", "site-packages/huge/d.py", "pkg/__pycache__/b.cpython.py", ".hidden/e.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x = 1\n")


def test_double_star_matches_every_depth(tmp_path):
    _tree(tmp_path)
    got = resolve_files([f"{tmp_path}/**/*.py"], ["*/site-packages/*", "*/__pycache__/*"], ErrorPolicy(), "src")
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["a.py", "pkg/b.py", "pkg/deep/c.py"]


def test_excluded_folders_are_never_entered(tmp_path, monkeypatch):
    _tree(tmp_path)
    visited = []
    real_walk = os.walk

    def spy(top, *a, **k):
        for dirpath, dirnames, filenames in real_walk(top, *a, **k):
            visited.append(dirpath)
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(files_mod.os, "walk", spy)
    resolve_files([f"{tmp_path}/**/*.py"], ["*/site-packages/*"], ErrorPolicy(), "src")
    assert not [v for v in visited if "site-packages" in v]
    assert str(tmp_path / "pkg" / "deep") in visited


def test_glob_regex_semantics():
    r = glob_regex("/d/**/x*.txt")
    assert r.match("/d/x1.txt") and r.match("/d/a/b/x2.txt")
    assert not r.match("/d/a/y.txt") and not r.match("/e/x.txt")
    assert glob_regex("/d/*.txt").match("/d/a.txt") and not glob_regex("/d/*.txt").match("/d/a/b.txt")
    assert glob_regex("/d/[!a]?.txt").match("/d/bc.txt") and not glob_regex("/d/[!a]?.txt").match("/d/ac.txt")


def test_plain_glob_folder_and_file(tmp_path):
    _tree(tmp_path)
    assert len(resolve_files([f"{tmp_path}/pkg/*.py"], [], ErrorPolicy(), "src")) == 1
    whole = resolve_files([str(tmp_path / "pkg")], ["*/__pycache__/*"], ErrorPolicy(), "src")
    assert {p.name for p in whole} == {"b.py", "c.py", "notes.txt"}
    twice = resolve_files([str(tmp_path / "a.py"), f"{tmp_path}/*.py"], [], ErrorPolicy(), "src")
    assert twice == [tmp_path / "a.py"]


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(UserError, match=r"data.sources.web.paths: .*nothing-\*\.txt: 0 files match"):
        resolve_files([f"{tmp_path}/nothing-*.txt"], [], ErrorPolicy(), "data.sources.web.paths")


def test_missing_and_empty_named_files(tmp_path):
    with pytest.raises(UserError, match="gone.txt: file not found"):
        resolve_files([str(tmp_path / "gone.txt")], [], ErrorPolicy(), "src")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty.txt: file is empty"):
        resolve_files([str(tmp_path / "empty.txt")], [], ErrorPolicy(), "src")
    skip = ErrorPolicy("skip", log=None)
    assert resolve_files([str(tmp_path / "gone.txt"), str(tmp_path / "empty.txt")], [], skip, "src") == []
    assert skip.skipped == 2


def test_fingerprint_detects_content_changes(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    before = fingerprint_files(paths)
    assert before["files"] == 2 and before["bytes"] == 6
    (tmp_path / "b.txt").write_text("owt")  # same size
    after = fingerprint_files(paths)
    assert after["sha256"] != before["sha256"]
    assert describe_file_changes(before, after) == [f"{tmp_path / 'b.txt'} changed"]


def test_tiny_spec_stdlib_walk_is_fast_and_pruned():
    stdlib = sysconfig.get_paths()["stdlib"]
    exclude = ["*/site-packages/*", "*/dist-packages/*", "*/test/*", "*/tests/*", "*/idle_test/*", "*/__pycache__/*"]
    start = time.perf_counter()
    found = resolve_files([f"{stdlib}/**/*.py"], exclude, ErrorPolicy(), "data.sources.stdlib.paths")
    assert time.perf_counter() - start < 2.0
    assert len(found) > 100
    assert not any("/site-packages/" in str(p) or "/test/" in str(p) for p in found)
