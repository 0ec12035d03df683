"""Find input files without walking what the spec excludes, read them, and fingerprint them."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from llmforge.atomic import sha256_file
from llmforge.data.errors import ErrorPolicy

_MAGIC = re.compile(r"[*?[]")


def _component_regex(part: str) -> str:
    """One path component of a glob as a regex; `*` and `?` never cross a `/`."""
    out, i = [], 0
    while i < len(part):
        ch = part[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := part.find("]", i + 2 if part[i + 1 : i + 2] in ("!", "]") else i + 1)) > 0:
            body = part[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob with `**` (zero or more folders) as a regex over full paths."""
    parts = pattern.split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _excluded(path: str, exclude: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pat) for pat in exclude)


def _walk(root: str, match: re.Pattern[str] | None, exclude: list[str]) -> list[str]:
    """Files under `root` matching `match`, pruning excluded and hidden folders before entering them."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirpath = dirpath.rstrip("/")
        # A trailing slash lets `*/site-packages/*` match the folder itself, so it is never entered.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _excluded(f"{dirpath}/{d}/", exclude))
        for name in filenames:
            full = f"{dirpath}/{name}"
            if not name.startswith(".") and (match is None or match.match(full)) and not _excluded(full, exclude):
                found.append(full)
    return found


def resolve_files(patterns: Iterable[str], exclude: list[str], errors: ErrorPolicy, where: str) -> list[Path]:
    """Absolute paths of every file the patterns name, sorted within a pattern, each once.

    A missing file or a pattern that matches nothing is bad input (raised, or skipped and counted).
    """
    seen: set[str] = set()
    files: list[Path] = []
    for pattern in patterns:
        full = os.path.abspath(os.path.expanduser(pattern))
        if not _MAGIC.search(full):
            if os.path.isdir(full):
                found = _walk(full, None, exclude)
            elif os.path.isfile(full):
                if os.path.getsize(full) == 0:
                    errors.bad(f"{where}: {pattern}", "file is empty", "remove it from the source's paths")
                    continue
                found = [] if _excluded(full, exclude) else [full]
            else:
                errors.bad(f"{where}: {pattern}", "file not found", "fix the path (relative paths resolve against the current directory)")
                continue
        elif "**" in full:
            parts = full.split("/")
            static = next(i for i, p in enumerate(parts) if _MAGIC.search(p))
            root = "/".join(parts[:static]) or "/"
            found = _walk(root, glob_regex(full), exclude) if os.path.isdir(root) else []
        else:
            found = [p for p in glob.glob(full) if os.path.isfile(p) and not _excluded(p, exclude)]
        found.sort()
        if not found:
            excl = f" after excluding {exclude}" if exclude else ""
            errors.bad(f"{where}: {pattern}", f"0 files match{excl}", "fix the pattern (`**` recurses into folders)")
        for p in found:
            if p not in seen:
                seen.add(p)
                files.append(Path(p))
    return files


def fingerprint_files(files: list[Path]) -> dict:
    """Size, mtime and content hash of each file, and one hash over all of them (order included)."""
    rows = []
    total = hashlib.sha256()
    for path in files:
        st = path.stat()
        digest = sha256_file(path)
        rows.append([str(path), st.st_size, st.st_mtime_ns, digest])
        total.update(f"{path}\0{digest}\0".encode())
    return {
        "files": len(rows),
        "bytes": sum(r[1] for r in rows),
        "mtime_ns": max((r[2] for r in rows), default=0),
        "sha256": total.hexdigest(),
        "per_file": rows,
    }


def describe_file_changes(old: dict, new: dict, limit: int = 3) -> list[str]:
    """Human-readable differences between two fingerprints: which files appeared, vanished or changed."""
    before = {r[0]: r for r in old.get("per_file", [])}
    after = {r[0]: r for r in new.get("per_file", [])}
    out = [f"{p} is new" for p in after if p not in before]
    out += [f"{p} is gone" for p in before if p not in after]
    out += [f"{p} changed" for p, r in after.items() if p in before and before[p][3] != r[3]]
    if not out and old.get("sha256") != new.get("sha256"):
        out.append("the file order changed")
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])
