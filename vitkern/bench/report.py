"""Report: the console tables (rich when installed, plain text otherwise), the progress line,
and the attention plots of ``vitkern bench``."""

from __future__ import annotations

from pathlib import Path


def console():
    """A rich console (200 columns when not a terminal), or None without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    c = Console()
    return c if c.is_terminal else Console(width=200)


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """One table on the console: rich when installed, aligned plain text otherwise."""
    con = console()
    if con is not None:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(title), title_justify="left")
        for c in columns:
            table.add_column(c, justify="left" if c in ("case", "provider") else "right")
        for r in rows:
            table.add_row(*(escape(x) for x in r))
        con.print(table)
        return
    print(title)
    widths = (
        [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)] if rows else [len(c) for c in columns]
    )
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))


class Progress:
    """A progress bar on a terminal; one line per finished case in logs."""

    def __init__(self, total: int) -> None:
        self._done, self._total = 0, total
        rich_console = console()
        if rich_console is None or not rich_console.is_terminal:  # logs (CI): one line per finished case
            self._p = None
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=rich_console,
                transient=False,
            )
            self._p.start()
            self._task = self._p.add_task("bench", total=total)
        except ImportError:
            self._p = None

    def step(self, description: str) -> None:
        self._done += 1
        if self._p is not None:
            self._p.update(self._task, advance=1, description=description)
        else:
            print(f"[{self._done}/{self._total}] {description}", flush=True)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()


def results_table(results: list[dict]) -> None:
    """Every provider of every case: times, spreads, ratios, throughput, memory, failures, notes."""
    cols = ["case", "provider", "median ms", "IQR ms", "x baseline", "x floor", "GFLOP/s", "% peak", "peak MB"]
    rows = []
    for r in results:
        first = True
        for name, p in r["providers"].items():
            lo, hi = p["spread_ms"]
            rows.append(
                [
                    r["case"] if first else "",
                    name,
                    f"{p['median_ms']:.2f}",
                    f"{lo:.2f}-{hi:.2f}",
                    f"{p['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in p else "",
                    f"{p['x_floor']:.2f}" if "x_floor" in p else "",
                    f"{p['gflops']:.1f}" if "gflops" in p else "",
                    f"{p['pct_gemm_peak']:.0f}" if "pct_gemm_peak" in p else "",
                    f"{p['peak_mem_mb']:.1f}",
                ]
            )
            first = False
        for name, why in r["failures"].items():
            rows.append(["", name, "failed", why[:60], "", "", "", "", ""])
        for name, val in r.get("notes", {}).items():
            rows.append(["", name, f"{val:.1e}" if isinstance(val, float) else str(val), "", "", "", "", "", ""])
        for name, secs in r["compile_s"].items():  # compile time, excluded from the timings above
            rows.append(["", f"{name}: compile", f"{secs * 1e3:.0f}", "(first call)", "", "", "", "", ""])
    print_table(
        "x baseline: speed-up over the case's baseline (eager / timm / public code); "
        "x floor: time / floor (SDPA without prior, or the bare GEMMs)",
        cols,
        rows,
    )


def summary_table(results: list[dict]) -> None:
    """vitkern's speed-up against each baseline, one row per case (baseline time / vitkern time)."""
    names = []
    rows_data = []
    for r in results:
        mine = [n for n in r["providers"] if n.startswith("vitkern")]
        for m in mine:
            t = r["providers"][m]["median_ms"]
            ratios = {n: p["median_ms"] / t for n, p in r["providers"].items() if not n.startswith("vitkern")}
            names += [n for n in ratios if n not in names]
            rows_data.append((f"{r['case']} {m}", ratios))
    if not rows_data:
        return
    rows = [[case, *(f"{ratios[n]:.2f}x" if n in ratios else "" for n in names)] for case, ratios in rows_data]
    print_table(
        "vitkern speed-up vs each baseline (baseline median / vitkern median; < 1 = baseline faster)",
        ["case", *names],
        rows,
    )


def plots(results: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    att = [r for r in results if r["op"] == "sp_attention"]
    written = []
    for metric, ylabel, fname in [
        ("speedup_vs_baseline", "speed-up over eager SP-SA", "attention_speedup.png"),
        ("peak_mem_mb", "peak extra memory (MB)", "attention_memory.png"),
    ]:
        groups: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
        for r in att:
            key = (r["dtype"].removeprefix("torch."), "fwd+bwd" if r["backward"] else "fwd", r["params"]["B"])
            for name, p in r["providers"].items():
                if metric in p:
                    groups.setdefault(key, {}).setdefault(name, []).append((r["params"]["N"], p[metric]))
        if not groups:
            continue
        names = sorted({n for series in groups.values() for n in series})
        colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}  # same colour in every panel
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, (key, series) in zip(axes[0], sorted(groups.items()), strict=True):
            for name, pts in sorted(series.items()):
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=colors[name])
            ax.set_title(f"sp_attention {key[0]} {key[1]} B={key[2]}")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(str(out / fname))
    return written
