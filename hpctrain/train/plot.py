"""The training-curves PNG: train and validation loss, learning rate, grad norm and throughput
against iteration, drawn from a run's logging.jsonl.

The trainer writes it when it ends (``<run>/train_loss.png``); ``hpctrain plot RUN`` draws it for
any run, also one still going: logging.jsonl is appended one line per step, so the file is read
as it stands and a half-written last line is skipped. A resumed run repeats the iterations after
its checkpoint; the last record of an iteration wins. matplotlib is optional (the ``plot`` extra).
"""
from __future__ import annotations

import json
from pathlib import Path

LOG_NAME = "logging.jsonl"
PNG_NAME = "train_loss.png"
# panel -> [(series, record key, label)]
PANELS = {
    "loss": [("train_loss", "loss", "train"), ("val_loss", "val_loss", "validation")],
    "learning rate": [("lr", "lr", "lr")],
    "grad norm": [("grad_norm", "grad_norm", "grad norm")],
    "tokens/s per GPU": [("throughput", "tokens_per_s_per_gpu", "tokens/s/GPU")],
}
INSTALL_HINT = "matplotlib is not installed: pip install 'hpctrain[plot]' (or pip install matplotlib)"


def find_log(path: str | Path) -> Path:
    """logging.jsonl from a file, a run dir, or a save root of v<N>-* versions (the newest with a log)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / LOG_NAME).is_file():
        return path / LOG_NAME
    versions = sorted(path.glob(f"v*-*/{LOG_NAME}"), key=lambda p: _version_number(p.parent.name))
    if versions:
        return versions[-1]
    raise FileNotFoundError(f"{path}: no {LOG_NAME} here nor in a v<N>-<time>/ run under it (give the run "
                            "folder the trainer saved into, or the --save root)")


def _version_number(name: str) -> int:
    head = name[1:].split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def read_records(log: Path) -> list[dict]:
    """Every complete JSON line; a line still being written (or otherwise unreadable) is skipped."""
    out = []
    with open(log, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("iteration"), int):
                out.append(rec)
    return out


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{series name: (iterations, values)} for every series in PANELS; the last record of an iteration wins."""
    out = {}
    for lines in PANELS.values():
        for name, key, _ in lines:
            by_it = {r["iteration"]: float(r[key]) for r in records if r.get(key) is not None}
            its = sorted(by_it)
            out[name] = (its, [by_it[i] for i in its])
    return out


def draw(data: dict[str, tuple[list[int], list[float]]], title: str = ""):
    """A matplotlib Figure with one panel per PANELS entry (raises ImportError without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.4 * len(PANELS)), sharex=True)
    for ax, (panel, lines) in zip(axes, PANELS.items()):
        for name, _, label in lines:
            its, values = data[name]
            if its:
                ax.plot(its, values, label=label, marker="o" if name == "val_loss" else None, markersize=3)
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    axes[-1].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_log(log: Path, out: Path | None = None) -> Path:
    """Draw ``log`` into ``out`` (default: train_loss.png next to it); returns the PNG path."""
    import matplotlib.pyplot as plt

    out = out or log.parent / PNG_NAME
    fig = draw(series(read_records(log)), title=log.parent.name)
    try:
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def command_line():
    from hpctrain.cli_args import CommandLine, Positional, flag

    return CommandLine("hpctrain plot", "draw a run's training curves (loss, validation loss, learning rate, "
                       "grad norm, throughput) into a PNG; works while the run is still going", flags=[
        flag("--output", help="PNG to write (default: RUN/train_loss.png)"),
    ], positionals=[Positional("run", "run folder (holds logging.jsonl) or the --save root", config="checkpoint.save")])


def run(argv: list[str]) -> int:
    """`hpctrain plot [RUN] [config.toml] [--output FILE]`."""
    import sys

    args = command_line().parse(argv)
    try:
        log = find_log(args.run)
        png = plot_log(log, Path(args.output) if args.output else None)
    except ImportError:
        print(f"hpctrain plot: {INSTALL_HINT}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError) as e:
        print(f"hpctrain plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {png} (from {log})")
    return 0
