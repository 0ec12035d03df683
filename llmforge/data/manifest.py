"""`<run_dir>/data/manifest.json`: what the shards hold and what they were made from.

It is written last, atomically, and removed before any shard is rewritten: shards count
only while a manifest lists them with matching sizes and sha256 checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmforge.atomic import remove
from llmforge.data.files import describe_file_changes
from llmforge.data.shards import file_problem
from llmforge.spec.errors import UserError

MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def manifest_path(data_dir: Path) -> Path:
    return data_dir / "manifest.json"


def read_manifest(data_dir: Path) -> dict:
    """The manifest, or a UserError saying why there is no usable one."""
    path = manifest_path(data_dir)
    if not path.is_file():
        raise UserError(f"{path} not found: {data_dir} holds no complete prepared data", "run the prepare stage first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable: {e}", "run the prepare stage again") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise UserError(f"{path}: unknown manifest version {manifest.get('version')!r}", f"this llmforge reads version {MANIFEST_VERSION}; prepare again")
    return manifest


def read_if_present(data_dir: Path, log) -> dict | None:
    """The manifest if there is a usable one; prepare rebuilds whatever it cannot trust."""
    if not manifest_path(data_dir).exists():
        return None
    try:
        return read_manifest(data_dir)
    except UserError as e:
        log(f"prepare: ignoring the old manifest: {e}")
        return None


def shard_problems(data_dir: Path, manifest: dict) -> list[str]:
    """Every shard that is missing, truncated or fails its checksum, by path."""
    out = []
    for split in manifest["splits"].values():
        for record in split["shards"]:
            problem = file_problem(data_dir / record["path"], record)
            if problem is not None:
                out.append(f"{data_dir / record['path']} {problem}")
    return out


def invalidate(data_dir: Path) -> None:
    """Remove the manifest (durably) first, then the shards and leftovers it listed."""
    remove(manifest_path(data_dir))
    for split in SPLITS:
        folder = data_dir / split
        if folder.is_dir():
            for p in [*folder.glob("shard-*.tar"), *folder.glob(".shard-*.tar.tmp-*")]:
                p.unlink()


def describe_changes(old: dict, inputs: dict, files: dict[str, list]) -> str:
    """What differs between the inputs recorded in `old` and the current ones, in words."""
    before, out = old.get("inputs", {}), []
    old_sources, new_sources = before.get("sources", {}), inputs["sources"]
    for name in new_sources.keys() - old_sources.keys():
        out.append(f"source {name!r} is new")
    for name in old_sources.keys() - new_sources.keys():
        out.append(f"source {name!r} was removed")
    for name in new_sources.keys() & old_sources.keys():
        if old_sources[name]["options"] != new_sources[name]["options"]:
            out.append(f"the options of source {name!r} changed")
        elif old_sources[name]["sha256"] != new_sources[name]["sha256"]:
            old_files = {"per_file": old.get("sources", {}).get(name, {}).get("files", []), "sha256": old_sources[name]["sha256"]}
            detail = describe_file_changes(old_files, {"per_file": files.get(name, []), "sha256": new_sources[name]["sha256"]})
            out.append(f"source {name!r}: " + (", ".join(detail) or "its files changed"))
    for key in sorted(inputs.keys() - {"sources"}):
        if before.get(key) != inputs[key]:
            out.append("the tokenizer or its training data changed" if key == "tokenizer" else f"{key} changed ({before.get(key)!r} → {inputs[key]!r})")
    return "; ".join(out) or "the data format changed"
