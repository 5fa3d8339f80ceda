"""Batch inference, as `swift infer --val_dataset D --result_path R`: answer every row of one or more
datasets and write one JSON line per row.

The rows are read the way the trainer reads them (hpctrain.data: every file type and layout, the
'path[:subset][#N]' spec, the alpaca / messages / sharegpt / query-response formats). The prompt
is the conversation up to its last assistant turn; that turn, when the row has one, is kept as
``labels`` so answers can be compared with the references. A row may also end with the user's
turn, or lack the answer field (an alpaca row without ``output``). Each output line holds
``messages`` (the prompt plus the generated answer), ``response``, ``labels`` and ``source``
(file:line). The lines go to ``R.partial`` as they come and the file is renamed to R at the end,
so an interrupted run keeps its answers and never looks finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hpctrain.data.errors import DataError
from hpctrain.data.formats import detect_format, normalize
from hpctrain.infer.generate import Sampling, generate_batch
from hpctrain.progress import Progress

_SLOT = "\x00"  # placeholder answer so a row without one passes the training-format checks


def _with_answer_slot(row: dict) -> tuple[dict, bool]:
    """(row with an answer turn, whether the row had its own answer)."""
    fmt = detect_format(row)
    turns = {"messages": ("messages", "role", "assistant", "content"),
             "sharegpt": ("conversations", "from", "gpt", "value")}.get(fmt)
    if turns:
        key, role_key, answer_role, content_key = turns
        items = row[key]
        if isinstance(items, list) and items and isinstance(items[-1], dict) and \
                items[-1].get(role_key) not in ("assistant", "gpt"):
            return {**row, key: [*items, {role_key: answer_role, content_key: _SLOT}]}, False
        return row, True
    if fmt is None and "query" in row:
        return {**row, "response": _SLOT}, False
    if fmt is None and "instruction" in row:
        return {**row, "output": _SLOT}, False
    return row, True


def prompt_of(row: dict, where: str, system: str | None) -> tuple[list[dict], str | None]:
    """(conversation to answer, reference answer or None) for one dataset row."""
    row, answered = _with_answer_slot(row)
    conv = normalize(row, where, mode="sft")
    turns = conv.messages
    label = None
    if turns[-1]["role"] == "assistant":
        label = turns[-1]["content"] if answered else None
        turns = turns[:-1]
    sys_prompt = conv.system if conv.system is not None else system
    return ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + turns, label


def default_result_path(model: str) -> Path:
    """``<model dir>/infer_result/<time>.jsonl``, where `swift infer` puts it."""
    import datetime

    base = Path(model)
    base = base.parent if base.is_file() else base
    return base / "infer_result" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.jsonl"


def infer_dataset(model, tokenizer, specs: list[str], result_path: Path, sampling: Sampling,
                  system: str | None = None, max_batch_size: int = 16, seed: int = 42) -> int:
    """Answer every row of ``specs`` into ``result_path``; returns the number of rows written."""
    from hpctrain.data.mixing import mix

    if result_path.exists():
        raise FileExistsError(f"--result_path {result_path} exists: choose a new file (answers are never "
                              "appended to or overwritten)")
    plan = mix(list(specs), seed, shuffle=False)
    if not len(plan):
        raise DataError(f"--val_dataset {' '.join(specs)}: no rows", "empty")
    result_path.parent.mkdir(parents=True, exist_ok=True)
    partial = result_path.with_name(result_path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out, Progress(len(plan), "infer", "rows") as bar:
        for start in range(0, len(plan), max_batch_size):
            ks = range(start, min(start + max_batch_size, len(plan)))
            rows = [plan.get(k) for k in ks]
            prompts = [prompt_of(raw, where, system) for raw, where in rows]
            answers = generate_batch(model, tokenizer, [p for p, _ in prompts], sampling)
            for (raw, where), (conv, label), answer in zip(rows, prompts, answers):
                rec = {"messages": conv + [{"role": "assistant", "content": answer}], "response": answer,
                       "labels": label, "source": where}
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(ks))
        os.fsync(out.fileno())
    os.replace(partial, result_path)
    return len(plan)
