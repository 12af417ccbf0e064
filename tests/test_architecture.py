"""The package's shape: one installed package, layers that import one way, a light CLI, one session site."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import code_metrics  # noqa: E402

# lowest first: a package may import only from packages at its own level or below
LAYERS = [
    "lily_deploy.core",         # the Lily layer, model/data loading, errors, file I/O, configs
    "lily_deploy.converters",   # the custom op: torch op, ONNX bodies, TensorRT plugin route
    "lily_deploy.runtime",      # sessions, runners, ONNX I/O, TensorRT backends
    "lily_deploy.calib",        # calibration readers, router statistics, Q/DQ settings
    "lily_deploy",              # the stages (training, folding, onnx_export, precision, ...)
    "lily_deploy.commands",     # the CLI (cli.py counts here too)
]
FOLDERS = {"converters": "lily_deploy.converters", "calib": "lily_deploy.calib", "lily_deploy": "lily_deploy"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str) -> str:
    if module == "lily_deploy.cli":
        return "lily_deploy.commands"
    for pkg in sorted(LAYERS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    raise AssertionError(module)


def _imports(path: Path) -> set[str]:
    """Every lily_deploy module ``path`` imports, at module level or inside functions."""
    module = _module_name(path)
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith("lily_deploy")}
    return out


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in LAYERS}
    for path in code_metrics.library_files(ROOT):
        src = _package_of(_module_name(path))
        for target in _imports(path):
            dst = _package_of(target)
            if dst != src and not (target == dst and dst == "lily_deploy"):  # `from lily_deploy import x` names a module
                graph[src].add(dst)
    return graph


def test_packages_import_one_way_and_have_no_cycle():
    graph = _package_graph()
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if rank[b] > rank[a])
    assert not upward, f"imports against the layering: {upward}"
    # and so no cycle: a walk from each package never comes back to it
    for start in LAYERS:
        seen, todo = set(), list(graph[start])
        while todo:
            p = todo.pop()
            assert p != start, f"import cycle through {start}"
            if p not in seen:
                seen.add(p)
                todo.extend(graph[p])


def test_the_walker_sees_function_level_imports():
    """Guard for the test above: a lazy import inside a function counts as an edge."""
    graph = _package_graph()
    assert "lily_deploy.runtime" in graph["lily_deploy"]  # stages import runtime, partly lazily
    assert "lily_deploy.core" in graph["lily_deploy.converters"]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_one_installed_package(tmp_path):
    for name in ("converters", "calib"):
        proc = _run(f"import {name}", tmp_path)
        assert proc.returncode != 0 and "No module named" in proc.stderr, (name, proc.stdout, proc.stderr)
    proc = _run("import lily_deploy.converters.hpmix, lily_deploy.calib.readers, lily_deploy.runtime.ort; print('ok')",
                tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("command", ["", "inspect", "finetune", "fold", "export", "quantize", "adapter", "build-trt", "generate", "parity",
                                     "bench", "quickstart"])
def test_help_imports_neither_torch_nor_onnxruntime(command, tmp_path):
    args = [command, "--help"] if command else ["--help"]
    code = (
        "import sys\n"
        "from lily_deploy.cli import cli\n"
        f"try:\n    cli({args!r}, prog_name='lily-deploy')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'transformers', 'peft', 'tensorrt', 'tensorrt_rtx')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-500:]


def test_one_place_creates_onnxruntime_sessions():
    sites = code_metrics.session_sites(ROOT)
    assert sites == [s for s in sites if s.startswith("lily_deploy/runtime/ort.py:")] and len(sites) == 1, sites


def test_no_library_function_is_longer_than_80_lines():
    long = [f"{name} ({where}, {n} lines)" for n, where, name in code_metrics.function_lengths(ROOT) if n > 80]
    assert not long, long


def test_code_metrics_counts_lengths_from_the_def_line(tmp_path):
    pkg = tmp_path / "lily_deploy"
    pkg.mkdir()
    (pkg / "m.py").write_text("def a():\n    x = 1\n    return x\n\n\nclass K:\n    def b(self):\n        pass\n")
    for top in ("converters", "calib"):
        (tmp_path / top).mkdir()
    rows = code_metrics.function_lengths(tmp_path)
    assert rows == [(3, "lily_deploy/m.py:1", "a"), (2, "lily_deploy/m.py:7", "K.b")]
