#!/usr/bin/env python3
"""Measure what the architecture issue promises: function lengths and onnxruntime session sites.

    python scripts/code_metrics.py            # the ten longest functions, and where sessions are made
    python scripts/code_metrics.py --max 80   # exit 1 if any library function is longer than 80 lines

A function's length counts from its ``def`` line (decorators excluded) to its last line. The
library is ``lily_deploy/``, ``converters/`` and ``calib/``; tests, benchmarks and scripts are not.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("lily_deploy", "converters", "calib")


def library_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for top in LIBRARY for p in (root / top).rglob("*.py"))


def function_lengths(root: Path = ROOT) -> list[tuple[int, str, str]]:
    """(lines, file:line, qualified name) of every function and method in the library, longest first."""
    rows = []
    for path in library_files(root):
        tree = ast.parse(path.read_text(), str(path))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        rows.append((child.end_lineno - child.lineno + 1,
                                     f"{path.relative_to(root)}:{child.lineno}", name))
                    stack.append((child, name + "."))
    return sorted(rows, key=lambda r: (-r[0], r[1]))


def session_sites(root: Path = ROOT) -> list[str]:
    """file:line of every call that creates an onnxruntime InferenceSession in the library."""
    sites = []
    for path in library_files(root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "InferenceSession":
                    sites.append(f"{path.relative_to(root)}:{node.lineno}")
    return sites


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max", type=int, default=None, help="fail if a library function is longer than this")
    ap.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = ap.parse_args(argv)
    rows = function_lengths()
    print(f"longest functions in {', '.join(LIBRARY)} ({len(rows)} functions):")
    for n, where, name in rows[: args.top]:
        print(f"  {n:4d}  {name}  ({where})")
    sites = session_sites()
    print(f"places that create an onnxruntime session: {len(sites)} ({', '.join(sites)})")
    if args.max is not None:
        over = [r for r in rows if r[0] > args.max]
        if over:
            print(f"FAILED: {len(over)} function(s) longer than {args.max} lines")
            return 1
        print(f"PASSED: no function longer than {args.max} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
