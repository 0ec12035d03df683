"""Resolve a validated spec into an ordered plan of stages bound to registry components.

The plan records which plugin provides every component, and a hash over the plan and
the resolved spec, so `plan.json` says exactly what ran. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from llmforge.registry.components import Registry
from llmforge.spec.schema import Spec

# Fields of a stage's options that select components, with the kind they select.
_COMPONENT_FIELDS = {"optimizer": "optimizer", "lr_schedule": "lr_schedule"}


def _bound(registry: Registry, kind: str, name: str) -> dict[str, str]:
    reg = registry.get(kind, name)
    return {"kind": kind, "name": name, "provider": reg.provider, "version": reg.version}


def _stage_components(registry: Registry, stage: Any) -> list[dict[str, str]]:
    out = [_bound(registry, "stage", stage.type)]
    train = getattr(stage, "train", None)
    if train is not None:
        for field, kind in _COMPONENT_FIELDS.items():
            out.append(_bound(registry, kind, getattr(train, field).name))
    for ev in getattr(stage, "evaluators", None) or []:
        out.append(_bound(registry, "evaluator", ev.name))
    for reward in getattr(stage, "rewards", None) or []:
        out.append(_bound(registry, "reward", reward.name))
    data = getattr(stage, "data", None)
    for src in (getattr(data, "sources", None) or {}).values():
        out.append(_bound(registry, "source", src.name))
    return out


def resolve(spec: Spec, registry: Registry) -> dict[str, Any]:
    """The plan: global components plus one entry per stage, in order."""
    shared = [_bound(registry, "tokenizer", spec.tokenizer.name), _bound(registry, "model", spec.model.name)]
    shared += [_bound(registry, "source", s.name) for s in spec.data.sources.values()]
    shared += [_bound(registry, "callback", c.name) for c in spec.logging.callbacks]
    stages = [
        {"name": s.name, "type": s.type, "init_from": s.init_from, "components": _stage_components(registry, s)}
        for s in spec.stages
    ]
    plan = {"version": 1, "name": spec.name, "components": shared, "stages": stages}
    body = json.dumps({"plan": plan, "spec": spec.model_dump(mode="json")}, sort_keys=True)
    plan["plan_hash"] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return plan


def unimplemented(plan: dict[str, Any], registry: Registry) -> list[str]:
    """Components in the plan whose implementation has not landed: `run` refuses them by name."""
    seen, missing = set(), []
    for comp in [*plan["components"], *(c for s in plan["stages"] for c in s["components"])]:
        key = (comp["kind"], comp["name"])
        if key in seen:
            continue
        seen.add(key)
        if registry.get(*key).component.factory is None:
            missing.append(f"{comp['kind']} {comp['name']!r} ({comp['provider']} {comp['version']})")
    return missing
