"""The `llmforge` command: thin verbs over spec → resolve → plan → registry → runtime.

Exit codes: 0 success, 2 bad input (a located message, never a traceback), 1 a failed
run, 75 a run stopped by SIGTERM that can be resumed.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT = 2


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. stages.1.train.max_steps=10")


def cmd_validate(args: argparse.Namespace) -> int:
    from llmforge.spec.validate import load_and_validate

    spec, _ = load_and_validate(args.spec, args.overrides, check_inputs=not args.skip_inputs)
    stages = ", ".join(f"{s.name} ({s.type})" for s in spec.stages)
    print(f"{args.spec}: valid — {spec.name}: {stages}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from llmforge.registry.manager import get_registry

    registry = get_registry()
    rows = registry.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["kind"]) for r in rows)
    name_width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['kind']:<{width}}  {r['name']:<{name_width}}  {r['provider']} {r['version']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from llmforge.registry.manager import get_registry
    from llmforge.spec.validate import spec_model

    schema = spec_model(get_registry()).model_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmforge", description="Train, evaluate and export LLMs from one YAML spec.")
    from llmforge import __version__

    parser.add_argument("--version", action="version", version=f"llmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec; exit 0 if valid, 2 if not")
    _spec_args(p)
    p.add_argument("--skip-inputs", action="store_true", help="do not check that input files exist (their data lives elsewhere)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list registered components and who provides them")
    p.add_argument("--json", action="store_true", help='a list of {"kind", "name", "provider", "version"}')
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec, plugin components included")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmforge.registry.components import RegistryError
    from llmforge.spec.errors import SpecError, UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UserError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
