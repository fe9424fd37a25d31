"""``learnopt compare``'s outputs: the tables as Markdown, CSV and JSON, the loss-curve and
meta-training plots (PNG), and the HTML page that holds them."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from learnopt.comparison import Comparison, Row

def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return format(x, spec)


def _lr(row: Row) -> str:
    if not row.lrs:
        return "—"
    return ", ".join(f"{x:.3g}" for x in row.lrs)


EVAL_COLUMNS = ["task", "steps", "optimizer", "tuned lr", "seeds", "mean log10 final loss", "95% CI (seeds)",
                "log10 normalised loss", "speedup vs {ref}", "time/step (ms)", "runs"]
META_COLUMNS = ["run", "group", "task", "meta-steps", "last meta-loss", "best val log10 final loss",
                "time/meta-step (s)", "checkpoint"]


def _eval_cells(c: Comparison) -> list[list[str]]:
    return [[r.task, "—" if r.steps is None else str(r.steps), r.optimizer, _lr(r), str(len(r.seed_values)),
             _fmt(r.mean), "±" + _fmt(r.ci95), _fmt(r.normalized),
             _fmt(r.speedup, ".2f") + ("×" if r.speedup is not None else ""),
             _fmt(None if r.time_per_step is None else 1000 * r.time_per_step, ".3g"), str(len(r.runs))]
            for r in c.rows]


def _meta_cells(c: Comparison) -> list[list[str]]:
    return [[m.run, m.group, m.task, "—" if m.meta_steps is None else str(m.meta_steps), _fmt(m.meta_loss, ".4g"),
             _fmt(m.best_val), _fmt(m.time_per_step, ".3g"), m.checkpoint or "—"] for m in c.meta_rows]


def format_markdown(c: Comparison) -> str:
    """Both tables as GitHub markdown.

    Args:
        c: the comparison.

    Returns:
        The tables, with the notes and the skipped runs.
    """
    parts = []
    if c.rows:
        head = [h.format(ref=c.reference) for h in EVAL_COLUMNS]
        parts += [
            f"Mean log10 final loss over held-out instances, 95% t-interval over seeds; speedup: steps tuned "
            f"{c.reference} needs ÷ steps the optimizer needs to reach the worse of their final losses "
            "(learnopt.compare.speedup).", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(cells) + " |" for cells in _eval_cells(c)),
        ]
    if c.meta_rows:
        parts += ["", "Meta-training runs:", "",
                  "| " + " | ".join(META_COLUMNS) + " |", "|" + "---|" * len(META_COLUMNS),
                  *("| " + " | ".join(cells) + " |" for cells in _meta_cells(c))]
    if not parts:
        read = "" if c.runs_read is None else (f" ({c.runs_read} runs read, {len(c.skipped)} skipped below; none of "
                                                "the others passes --group, --tag, --task and --job_type)")
        parts = [f"no runs matched{read}"]
    if c.notes:
        parts += ["", *(f"Note: {n}." for n in c.notes)]
    if c.skipped:
        parts += ["", f"Skipped runs ({len(c.skipped)}):", "", *(f"- {s.path or s.run}: {s.reason}" for s in c.skipped)]
    return "\n".join(parts).strip()


def format_csv(c: Comparison) -> str:
    """The evaluation rows as CSV (full precision); meta-training rows follow after a blank line.

    Args:
        c: the comparison.

    Returns:
        The CSV text.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if c.rows:
        fields = ["task", "steps", "optimizer", "kind", "lr", "seeds", "mean_log10_final_loss", "ci95",
                  "mean_log10_normalized_loss", "speedup_vs_reference", "time_per_step_s", "runs"]
        writer.writerow(fields)
        for r in c.rows:
            d = r.as_dict()
            writer.writerow([d["task"], d["steps"], d["optimizer"], d["kind"], _lr(r), d["seeds"],
                             d["mean_log10_final_loss"], d["ci95"], d["mean_log10_normalized_loss"],
                             d["speedup_vs_reference"], d["time_per_step_s"], ";".join(d["runs"])])
    if c.meta_rows:
        if c.rows:
            buf.write("\n")
        fields = list(c.meta_rows[0].as_dict())
        writer.writerow(fields)
        for m in c.meta_rows:
            writer.writerow([m.as_dict()[f] for f in fields])
    return buf.getvalue().rstrip("\n")


def format_comparison(c: Comparison, fmt: str) -> str:
    """The comparison in one of ``learnopt compare``'s formats.

    Args:
        c: the comparison.
        fmt: ``"markdown"``, ``"csv"`` or ``"json"`` (strict JSON: NaN as null, an infinite
            speedup as ``"inf"``).

    Returns:
        The text.

    Raises:
        ValueError: an unknown format.
    """
    if fmt == "markdown":
        return format_markdown(c)
    if fmt == "csv":
        return format_csv(c)
    if fmt == "json":
        return json.dumps(_strict_json(c.to_json()), indent=1)
    raise ValueError(f"format must be markdown, csv or json, got {fmt!r}")


def _strict_json(value: Any) -> Any:
    """Standard JSON has no NaN or infinity: NaN (no interval from one seed) becomes null, an
    infinite speedup the string ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _footer(fig: Any, command: str | None) -> None:
    if command:
        fig.text(0.01, 0.005, command, fontsize=6, color="0.4", ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if command else 0, 1, 1))


def plot_comparison(c: Comparison, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """One PNG per task and step count (mean log10 loss against inner step, one line per
    optimizer, the reference dashed; ``curves_<task>.png``, ``curves_<task>_<steps>.png`` where a
    task was run for several step counts) and one of meta-loss and validation score against
    meta-step (``meta_train.png``). Tuning-split rows get their own files (``_<split>`` suffix).

    Args:
        c: the comparison.
        out_dir: where the PNGs go (created if missing).
        command: the command line, written in each figure's footer.

    Returns:
        The paths written.
    """
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = list(dict.fromkeys((r.task, r.steps, r.split) for r in c.rows))
    for task, steps, split in panels:
        rows = [r for r in c.rows if (r.task, r.steps, r.split) == (task, steps, split) and r.curve]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            label = f"{r.optimizer}" + (f" (lr {_lr(r)})" if r.lrs else "") + (
                f", {r.speedup:.2f}×" if r.speedup is not None and math.isfinite(r.speedup) else "")
            ax.plot(range(len(r.curve)), r.curve, label=label, lw=1.2 if r.lrs else 2,
                    ls="--" if r.optimizer == c.reference else "-")
        ax.set_xlabel("inner step")
        ax.set_ylabel("mean log10 loss (held-out instances)" if rows[0].split == "test"
                      else f"mean log10 loss ({rows[0].split} instances)")
        ax.set_title(f"{task}: speedup vs tuned {c.reference} in the legend")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _footer(fig, command)
        several = len({st for t, st, _ in panels if t == task}) > 1
        name = f"curves_{_slug(task)}" + (f"_{steps}" if several else "") + ("" if split == "test" else f"_{split}")
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    metas = [m for m in c.meta_rows if m.curve[0] or m.val_curve[0]]
    if metas:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
        for m in metas:
            ax1.plot(*m.curve, label=m.run)
            ax2.plot(*m.val_curve, marker="o", ms=3, label=m.run)
        ax1.set(xlabel="meta-step", ylabel="meta-loss (train/meta_loss)", title="meta-loss")
        ax2.set(xlabel="meta-step", ylabel="val mean log10 final loss", title="validation")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        _footer(fig, command)
        path = out / "meta_train.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def write_html(c: Comparison, plots: Sequence[Path], path: str | os.PathLike, command: str | None = None) -> Path:
    """A self-contained page: the tables and the plots (embedded), and the command that made them.

    Args:
        c: the comparison.
        plots: the PNGs to embed.
        path: the page's path (its directory is created if missing).
        command: the command line shown at the top.

    Returns:
        ``path``.
    """
    import base64

    def table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    body = [f"<h1>learnopt compare</h1><p><code>{html.escape(command or '')}</code></p>"]
    if c.rows:
        body += ["<h2>Optimizers × tasks</h2>", f"<p>Mean log10 final loss, 95% t-interval over seeds; speedup "
                 f"against tuned {html.escape(c.reference)} (learnopt.compare.speedup).</p>",
                 table([h.format(ref=c.reference) for h in EVAL_COLUMNS], _eval_cells(c))]
    if c.meta_rows:
        body += ["<h2>Meta-training runs</h2>", table(META_COLUMNS, _meta_cells(c))]
    body += [f"<p>Note: {html.escape(n)}.</p>" for n in c.notes]
    if c.skipped:
        body += ["<h2>Skipped runs</h2>", table(["run", "reason"], [[s.path or s.run, s.reason] for s in c.skipped])]
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(p).name)}">'
                    f"<figcaption>{html.escape(Path(p).name)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>learnopt compare</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
