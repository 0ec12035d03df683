"""Fuzz `validate` with mutated shipped specs: always exit 0 or 2, with located messages, never a traceback."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmforge.cli import main

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = {p.name: p.read_text() for p in sorted((ROOT / "specs").glob("*.yaml"))}

# An issue line: two spaces, a location (file, file:line:col, or the override), a space.
ISSUE = re.compile(r"""^  (?:\S+\.ya?ml(?::\d+:\d+)?|override (?:'.*?'|".*?")) [^ ]""")

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "adamw", "bf16", "pretrain", "${oc.env:NOPE}", "${nope}", "${stdlib:}"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
keys = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["name", "type", "lr", "train", "model", "extends", "num_layers", "0"]))


def validate(text: str, overrides: list[str] = ()) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(["validate", str(path), *overrides, "--skip-inputs"])
            except SystemExit as e:  # argparse: an override that looks like an option
                code = e.code
        return code, err.getvalue()


def assert_clean(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = err.splitlines()
        assert lines[0].startswith("error: "), err
        issues = [line for line in lines[1:] if not line.startswith("      ")]  # hints are indented further
        if lines[0].startswith("error: ") and "problem" in lines[0]:
            assert issues and all(ISSUE.match(line) for line in issues), err


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def parent_and_key(data: Any, path: tuple) -> tuple[Any, Any]:
    node = data
    for part in path[:-1]:
        node = node[part]
    return node, path[-1]


@FUZZ
@given(spec=st.sampled_from(sorted(SHIPPED)), data=st.data(), op=st.sampled_from(["replace", "add_key", "delete"]))
def test_mutated_specs(spec: str, data: st.DataObject, op: str) -> None:
    tree = yaml.safe_load(SHIPPED[spec])
    path = data.draw(st.sampled_from([p for p in paths(tree) if p]))
    parent, key = parent_and_key(tree, path)
    if op == "replace":
        parent[key] = data.draw(values)
    elif op == "add_key":
        target = parent[key] if isinstance(parent[key], dict) else tree
        target[data.draw(keys)] = data.draw(values)
    else:
        del parent[key]
    assert_clean(*validate(yaml.safe_dump(tree, sort_keys=False)))


@FUZZ
@given(spec=st.sampled_from(sorted(SHIPPED)), data=st.data())
def test_corrupted_yaml_text(spec: str, data: st.DataObject) -> None:
    text = SHIPPED[spec]
    cut = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(alphabet=st.sampled_from(list(":{}[]-#&*!|>'\"%@`\t\n ,?x0")), max_size=6))
    choice = data.draw(st.sampled_from(["insert", "truncate", "empty"]))
    mutated = {"insert": text[:cut] + junk + text[cut:], "truncate": text[:cut], "empty": junk if junk.strip() == "" else ""}[choice]
    assert_clean(*validate(mutated))


override_keys = st.one_of(
    st.sampled_from(["model.num_layers", "stages.1.train.max_steps", "stages.9.name", "parallelism", "seed", "tokenizer.name",
                     "stages.1.train.optimizer.lr", "stages.1.train.optimizer", "model", "stages", "data.sources.x", "name.sub"]),
    st.text(alphabet=st.sampled_from(list("abc._0129")), min_size=1, max_size=10),
)
override_values = st.one_of(
    st.sampled_from(["", "3", "-1", "1e400", "null", "true", "[1, 2]", "{a: 1}", "{name: adamww}", "${nope}", "'x", "[", "}"]),
    st.text(max_size=8),
)


@FUZZ
@given(spec=st.sampled_from(sorted(SHIPPED)), pairs=st.lists(st.tuples(override_keys, override_values), min_size=1, max_size=3))
def test_random_overrides(spec: str, pairs: list[tuple[str, str]]) -> None:
    overrides = [f"{k}={v}" for k, v in pairs]
    assert_clean(*validate(SHIPPED[spec], overrides))
