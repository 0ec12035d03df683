"""Load a spec: YAML with `extends`, `${...}` interpolation and dotlist overrides.

OmegaConf does the merging and interpolation, but it forgets where a key came from, so
we compose the YAML ourselves first and keep a map from each key path to
`file:line:col` (or to the override that set it). Every later error uses that map.
"""

from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmforge.spec.errors import SpecError, SpecIssue

Path_ = tuple[str | int, ...]


@dataclass
class LoadedSpec:
    """The raw, interpolated spec data plus where each key was set."""

    data: dict[str, Any]
    locations: dict[Path_, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def locate(self, path: Path_) -> str | None:
        """The location of the deepest known prefix of `path` (a missing key points at its parent)."""
        return _nearest(self.locations, path)


def _nearest(locations: dict[Path_, str], path: Path_) -> str | None:
    for n in range(len(path), -1, -1):
        loc = locations.get(tuple(path[:n]))
        if loc:
            return loc
    return None


def _key_path(full_key: str | None) -> Path_:
    """OmegaConf's 'data.sources.web.paths[0]' -> ('data', 'sources', 'web', 'paths', 0)."""
    tokens = re.findall(r"\[(\d+)\]|([^.\[\]]+)", full_key or "")
    return tuple(int(index) if index else key for index, key in tokens)


def _config(build: Callable[[], Any], locations: dict[Path_, str]) -> Any:
    """Run an OmegaConf constructor; a malformed `${...}` or an unsupported value becomes a located issue."""
    from omegaconf.errors import GrammarParseError, OmegaConfBaseException

    try:
        return build()
    except OmegaConfBaseException as e:
        path = _key_path(getattr(e, "full_key", None))
        msg = str(e).splitlines()[0]
        if isinstance(e, GrammarParseError):
            issue = SpecIssue(path, f"invalid interpolation: {msg}", "fix the ${...} expression, or escape a literal one as \\${...}", _nearest(locations, path))
        else:
            issue = SpecIssue(path, f"unsupported value: {msg}", "quote it to make it a string", _nearest(locations, path))
        raise SpecError([issue]) from None


def _stdlib_dir(*_: object) -> str:
    # The tiny spec's corpus is Python's own standard library: every machine has it.
    return sysconfig.get_paths()["stdlib"]


_RESOLVERS_REGISTERED = False


def _register_resolvers() -> None:
    global _RESOLVERS_REGISTERED
    if _RESOLVERS_REGISTERED:
        return
    from omegaconf import OmegaConf

    # omegaconf 2.4 renamed register_new_resolver; 2.3 (some GPU images) only has the old name.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("stdlib", _stdlib_dir, replace=True)
    _RESOLVERS_REGISTERED = True


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _positions(node: yaml.Node, shown: str, prefix: Path_, out: dict[Path_, str]) -> None:
    """Record file:line:col of every mapping key and sequence item under `node`."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            path = (*prefix, key)
            out[path] = f"{shown}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}"
            _positions(value_node, shown, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = f"{shown}:{item.start_mark.line + 1}:{item.start_mark.column + 1}"
            _positions(item, shown, path, out)


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """Parse once, keeping the node tree (for positions) and the data; libyaml when present (10x faster)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def _read_yaml(path: Path, stack: tuple[Path, ...]) -> tuple[dict, dict[Path_, str], list[str]]:
    """Read one file and its `extends` bases; return merged data, positions and files read."""
    shown = _display(path)
    if path in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path))
        raise SpecError([SpecIssue(("extends",), f"circular extends: {chain}", "remove one of the extends entries", shown)])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = _display(stack[-1]) if stack else None
        raise SpecError([SpecIssue((), f"spec file not found: {shown}", "check the path (extends paths are relative to the spec that names them)", where)])
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise SpecError([SpecIssue((), f"cannot read {shown}: {e}", "a spec is a UTF-8 YAML file", shown)])
    try:
        node, data = _parse(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([SpecIssue((), f"invalid YAML: {problem}", "fix the YAML syntax at this position", where)])
    if data is None:
        raise SpecError([SpecIssue((), "the spec file is empty", "start from specs/tiny.yaml", shown)])
    if not isinstance(data, dict):
        raise SpecError([SpecIssue((), f"a spec must be a mapping of sections, got {type(data).__name__}", "start from specs/tiny.yaml", shown)])
    positions: dict[Path_, str] = {}
    _positions(node, shown, (), positions)
    files = [shown]

    bases = data.pop("extends", None)
    if bases is None:
        return data, positions, files
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise SpecError([SpecIssue(("extends",), "extends must be a path or a list of paths", None, positions.get(("extends",)))])
    merged: dict = {}
    merged_pos: dict[Path_, str] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            why = "is a directory" if base_path.is_dir() else "does not exist"
            raise SpecError([SpecIssue(("extends",), f"extends {base!r}: {_display(base_path)!r} {why}",
                                       "extends paths are relative to the spec that names them", positions.get(("extends",)))])
        base_data, base_pos, base_files = _read_yaml(base_path, (*stack, path))
        merged = _layer(merged, merged_pos, base_data, base_pos)
        files += base_files
    merged = _layer(merged, merged_pos, data, {k: v for k, v in positions.items() if k[:1] != ("extends",)})
    return merged, merged_pos, files


def _layer(merged: dict, merged_pos: dict[Path_, str], data: dict, positions: dict[Path_, str]) -> dict:
    """`data` over `merged`: mappings merge key by key, except a component whose name changes.

    `tokenizer: {name: pretrained, path: ...}` over a `bpe` tokenizer replaces it: bpe's
    vocab_size would be an unknown key of the pretrained one (dotlist overrides do the same).
    """
    from omegaconf import OmegaConf

    for path in _switched_components(merged, data, ()):
        del _get(merged, path[:-1])[path[-1]]
        for old in [p for p in merged_pos if p[: len(path)] == path]:
            del merged_pos[old]
    cfg = _config(lambda: OmegaConf.merge(OmegaConf.create(merged), OmegaConf.create(data)), positions)
    _overlay(merged_pos, positions, data)
    return OmegaConf.to_container(cfg, resolve=False)


def _switched_components(old: dict, new: dict, prefix: Path_) -> list[Path_]:
    """Paths of mappings in `new` that choose another component (`name`/`type`) than `old` had there."""
    found = []
    for key, value in new.items():
        before = old.get(key)
        if not (isinstance(value, dict) and isinstance(before, dict)):
            continue
        if any(k in value and k in before and value[k] != before[k] for k in ("name", "type")):
            found.append((*prefix, key))
        else:
            found += _switched_components(before, value, (*prefix, key))
    return found


def _overlay(into: dict[Path_, str], new: dict[Path_, str], new_data: dict) -> None:
    """Later files win. A list is replaced whole by OmegaConf, so drop the old list's positions."""
    for path, loc in new.items():
        value = _get(new_data, path)
        if isinstance(value, list):
            for old in [p for p in into if len(p) > len(path) and p[: len(path)] == path]:
                del into[old]
        into[path] = loc


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _parse_override(text: str) -> tuple[Path_, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError([SpecIssue((), f"override {text!r} is not KEY=VALUE", "write e.g. stages.1.train.max_steps=10", f"override {text!r}")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError([SpecIssue((), f"override {text!r} has an empty key part", "write dotted keys like model.num_layers=4", f"override {text!r}")])
    return tuple(int(p) if p.isdigit() else p for p in parts), value


def _switches_component(cfg: Any, key: str, value: Any) -> bool:
    """Does this mapping override choose a different component (`name`/`type`) than the spec had?"""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(value, dict):
        return False
    current = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(current, DictConfig):
        return False
    return any(k in value and k in current and value[k] != current[k] for k in ("name", "type"))


def _value_paths(value: Any, prefix: Path_) -> list[Path_]:
    """Every key path an override value sets, the leaves last."""
    if not isinstance(value, dict):
        return [prefix]
    return [prefix, *(p for k, v in value.items() for p in _value_paths(v, (*prefix, k)))]


def _apply_override(cfg: Any, text: str, locations: dict[Path_, str]) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path, value = _parse_override(text)
    key = ".".join(str(p) for p in path)
    where = f"override {text!r}"
    # `optimizer={name: sgd}` replaces the old optimizer's options instead of merging
    # adamw's betas into sgd; any other mapping merges into what the spec had.
    replace = not isinstance(value, dict) or _switches_component(cfg, key, value)
    try:
        OmegaConf.update(cfg, key, value, merge=not replace)
    except (OmegaConfBaseException, ValueError, TypeError, KeyError, IndexError) as e:
        msg = str(e).splitlines()[0]
        raise SpecError([SpecIssue(path, f"cannot apply override: {msg}", "check the key path; list items are addressed by index, e.g. stages.1.train.max_steps=10", where)])
    touched = [path] if replace else _value_paths(value, path)
    for sub in touched:
        if replace or not isinstance(_get(value, sub[len(path):]), dict):
            for old in [p for p in locations if p[: len(sub)] == sub]:
                del locations[old]
        if replace or sub != path or sub not in locations:
            locations[sub] = where


def _resolve(node: Any, path: Path_, issues: list[SpecIssue], locations: dict[Path_, str]) -> Any:
    """Resolve interpolations leaf by leaf, so that a failing `${...}` is reported at its key."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, DictConfig):
        items = [(k, k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(i, i) for i in range(len(node))]
    else:
        return node
    out: dict | list = {} if isinstance(node, DictConfig) else []
    for key, index in items:
        sub = (*path, key)
        try:
            child = node[index]
        except OmegaConfBaseException as e:
            loc = _nearest(locations, sub)
            msg = str(e).splitlines()[0]
            issues.append(SpecIssue(sub, f"cannot resolve interpolation: {msg}", "check the ${...} expression; environment variables use ${oc.env:NAME,default}", loc))
            child = None
        value = _resolve(child, sub, issues, locations)
        if isinstance(out, dict):
            out[key] = value
        else:
            out.append(value)
    return out


def load_spec(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> LoadedSpec:
    """Read, merge, override and interpolate a spec. Raises SpecError with located issues."""
    from omegaconf import OmegaConf

    _register_resolvers()
    data, locations, files = _read_yaml(Path(path).resolve(), ())
    # A missing top-level key has no line of its own: point at the spec file.
    locations.setdefault((), files[0])
    cfg = _config(lambda: OmegaConf.create(data), locations)
    for text in overrides:
        _apply_override(cfg, text, locations)
    issues: list[SpecIssue] = []
    resolved = _resolve(cfg, (), issues, locations)
    if issues:
        raise SpecError(issues)
    return LoadedSpec(resolved, locations, files)
