"""Report writers shared by ``parity`` and ``bench``: JSON, a Markdown table and a PNG plot.

Every report is a plain dict with a ``schema_version`` (bumped only when a key is renamed or
removed; new keys may appear) and a ``kind`` (``"parity"`` or ``"bench"``). ``write_reports``
puts ``<kind>.json``, ``<kind>.md`` and ``<kind>.png`` into one folder, each written atomically.
The PNG needs matplotlib (``pip install 'lily-deploy[plot]'``); without it the JSON and the
Markdown are still written and the result says why the plot is missing.
"""
from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Optional, Sequence

from .core.errors import LilyDeployError
from .core.fileio import atomic_file, check_not_input, write_json

SCHEMA_VERSION = 1


def environment() -> dict:
    """Versions and hardware a report's numbers belong to."""
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "processor": cpu_name()}
    for pkg in ("lily-deploy", "torch", "onnxruntime", "onnx", "transformers", "peft"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    try:
        import torch

        env["cuda_gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA install must not stop a report
        env["cuda_gpu"] = None
    return env


def cpu_name() -> Optional[str]:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A GitHub Markdown table; ``align`` is one letter per column (l/r), default numbers right."""
    cells = [[_cell(v) for v in row] for row in rows]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """A fixed-width terminal table (all cells already strings)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    fmt = lambda row: indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers)] + [fmt(r) for r in rows])


def write_markdown(path: str | os.PathLike, text: str, flag: str = "--report-dir") -> None:
    with atomic_file(path, flag) as tmp:
        tmp.write_text(text.rstrip() + "\n")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, flag: str = "--report-dir") -> None:
    plt = _pyplot()
    with atomic_file(path, flag) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_bench(report: dict, path: str | os.PathLike) -> Optional[str]:
    """Latency (p50, band to p90) vs batch size, one line per model (colour) and backend (dash), one
    column per sequence length; below it, each model's latency ratio to the base when a base was given."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install 'lily-deploy[plot]'): no plot written"
    rows = report.get("results") or []
    if not rows:
        return "no measurements: no plot written"
    seqs = sorted({r["seq_len"] or 0 for r in rows})
    has_ratio = any(r.get("overhead_vs_base") for r in rows)
    nrows = 2 if has_ratio else 1
    fig, axes = plt.subplots(nrows, len(seqs), figsize=(5.2 * len(seqs), 3.8 * nrows), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    dashes = ["-", "--", ":", "-."]
    batch_sizes = sorted({r["batch_size"] for r in rows})
    for col, seq in enumerate(seqs):
        ax = axes[0][col]
        rax = axes[1][col] if has_ratio else None
        for mi, model in enumerate(models):
            for bi, backend in enumerate(backends):
                pts = sorted((r["batch_size"], r["p50_ms"], r["p90_ms"], r.get("overhead_vs_base")) for r in rows
                             if r["model"] == model and r["backend"] == backend and (r["seq_len"] or 0) == seq)
                if not pts:
                    continue
                xs, p50, p90, ratio = zip(*pts)
                style = dict(color=colors[mi % len(colors)], linestyle=dashes[bi % len(dashes)], marker="o")
                ax.plot(xs, p50, label=f"{model} ({backend})", **style)
                ax.fill_between(xs, p50, p90, color=style["color"], alpha=0.12)
                if rax is not None and any(v is not None for v in ratio):
                    rax.plot([x for x, v in zip(xs, ratio) if v is not None], [v for v in ratio if v is not None],
                             label=f"{model} ({backend})", **style)
        for a in [ax] + ([rax] if rax is not None else []):
            a.set_xscale("log", base=2)
            a.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            a.set_xlabel("batch size")
            a.grid(True, which="both", alpha=0.3)
        ax.set_yscale("log")
        ax.set_ylabel("latency p50 (ms), band to p90")
        ax.set_title(f"sequence {seq}" if seq else "inputs")
        if rax is not None:
            rax.axhline(1.0, color="black", linewidth=0.8)
            rax.set_ylabel("p50 / p50 of base (same backend)")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    s = report.get("settings", {})
    fig.suptitle(f"lily-deploy bench: {s.get('threads')} thread(s), {s.get('iters')} interleaved iterations",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return None


def plot_parity(report: dict, path: str | os.PathLike) -> Optional[str]:
    """Task metric per candidate (by precision) against the reference, with top-1 agreement beside it."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed (pip install 'lily-deploy[plot]'): no plot written"
    cands = [c for c in report.get("candidates", []) if c.get("status") != "SKIPPED" and c.get("batches")]
    if not cands:
        return "no candidate ran: no plot written"
    metric = report.get("metric", "metric")
    names = [f"{c['name']}\n{c['precision']}, {c['routing']}" for c in cands]
    worst_b = [min(c["batches"], key=lambda b: b["metric_delta"]) for c in cands]
    worst = [b["metric"] for b in worst_b]
    refs = [b["reference_metric"] for b in worst_b]  # the reference in that candidate's routing and batching
    agree = [min(b["agreement"] for b in c["batches"]) for c in cands]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 2.0 * len(cands) + 3), 4.2))
    colors = ["#2a9d8f" if c["status"] == "PASSED" else "#e76f51" for c in cands]
    ax1.bar(range(len(cands)), worst, color=colors)
    ax1.hlines(refs, [i - 0.45 for i in range(len(cands))], [i + 0.45 for i in range(len(cands))], color="black",
               linestyles="--", linewidth=1.2, label="torch reference (same routing and batches)")
    lo = min(worst + refs)
    ax1.set_ylim(max(0.0, lo - max(2.0, 0.1 * (100 - lo))), min(100.0, max(worst + refs) + 1.0))
    for i, (v, c) in enumerate(zip(worst, cands)):
        delta = worst_b[i]["metric_delta"]
        ax1.text(i, max(v, refs[i]), f"{v:.2f}\n({delta:+.2f})", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(cands)), names, fontsize=8)
    ax1.set_ylabel(f"{metric} (%), worst batch size")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.bar(range(len(cands)), agree, color=colors)
    ax2.set_ylim(max(0.0, min(agree) - 3.0), 100.5)
    for i, v in enumerate(agree):
        ax2.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(cands)), names, fontsize=8)
    ax2.set_ylabel("top-1 agreement with torch (%)")
    fig.suptitle(f"lily-deploy parity: {report.get('summary', '')}", fontsize=10)
    save_figure(fig, path)
    return None


PLOTTERS = {"parity": plot_parity, "bench": plot_bench,
            "decoder-bench": lambda report, path: "no plot for decoder benchmarks: the table says it all"}


def report_paths(folder: str | os.PathLike, kind: str) -> dict[str, Path]:
    """Where :func:`write_reports` puts a ``kind`` report in ``folder``."""
    folder = Path(folder)
    return {"json": folder / f"{kind}.json", "markdown": folder / f"{kind}.md", "png": folder / f"{kind}.png"}


def check_report_dir(folder: str | os.PathLike, kind: str, inputs: dict, flag: str = "--report-dir") -> None:
    """Refuse, before the run, a report folder (or a report file in it) that is one of the run's inputs.

    ``inputs`` maps a name for the message to an input path (model names that are no path are fine).
    """
    check_not_input(folder, inputs, flag)
    for path in report_paths(folder, kind).values():
        check_not_input(path, inputs, flag)


def write_reports(report: dict, markdown: str, folder: str | os.PathLike, flag: str = "--report-dir",
                  inputs: Optional[dict] = None) -> dict:
    """``<kind>.json``, ``<kind>.md`` and ``<kind>.png`` in ``folder`` (made if missing); returns the paths.

    With ``inputs`` (as for :func:`check_report_dir`), a report that would overwrite an input is refused.
    """
    kind = report["kind"]
    folder = Path(folder)
    if inputs:
        check_report_dir(folder, kind, inputs, flag)
    if folder.exists() and not folder.is_dir():
        raise LilyDeployError(f"{flag} {folder}: exists and is not a folder")
    if not folder.exists():
        parent = folder.parent if str(folder.parent) else Path(".")
        if not parent.is_dir():
            raise LilyDeployError(f"{flag} {folder}: folder {parent} does not exist")
        folder.mkdir()
    paths: dict = report_paths(folder, kind)
    write_json(paths["json"], report, flag)
    write_markdown(paths["markdown"], markdown, flag)
    why = PLOTTERS[kind](report, paths["png"])
    if why is not None:
        paths["png"] = None
        paths["png_note"] = why
    return paths
