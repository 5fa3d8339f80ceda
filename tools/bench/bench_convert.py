"""Benchmark: HF -> mcore conversion and offline reshard of a 7B-shaped checkpoint, next to a plain
disk copy of the same bytes in the same run, with wall time and peak RSS of each step.

    python tools/bench/bench_convert.py --workdir /work/bench_convert_tmp [--num_layers 28]
        [--reshard_torch] [--no_drop_caches] [--keep] [--json out.json]

Random bf16 weights with the shapes of hpctrain/assets/configs/qwen2.5-7b-instruct.config.json
(the same file as ../shared/data/qwen2.5-configs; --num_layers N keeps every tensor shape and cuts
the layer count: peak RSS of a streaming converter depends on the largest tensor, not the number
of layers). The shards are generated streaming (header first, then each tensor in slices), so the
generator itself never holds more than one slice.

Every step runs as a child process. Peak RSS is measured two ways: polling /proc every 50 ms for
the summed RSS of the child and all its descendants (megatron / DCP writers may fork), split into
anonymous and file-backed (mmap) pages, and the kernel's ru_maxrss of the child from wait4 (the
largest single process, exact but blind to concurrent children; it also carries the RSS the
forked benchmark process had before exec, ~0.4 GiB). CPU seconds (user + sys, the child and its
reaped descendants) come from wait4 too: on a shared machine they say more than wall time, which
stretches with the other users' load. Before each timed step the page
cache is dropped (``echo 1 > /proc/sys/vm/drop_caches``, needs root; --no_drop_caches to skip), so
the copy and the conversions all start cold. The copy is ``cp -r`` followed by ``sync`` because the
converter fsyncs every file it writes (torch DCP's FileSystemWriter); both sides pay for the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "hpctrain" / "assets" / "configs" / "qwen2.5-7b-instruct.config.json"
SHARD_BYTES = 4 * 2**30
SLICE_ELEMS = 32 * 2**20  # elements generated at a time (64 MiB of bf16)


# ---------------------------------------------------------------- the random model, streamed


def model_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Qwen2 checkpoint with config ``cfg``, in file order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + n, s) for n, s in [
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
            ("self_attn.q_proj.weight", (h, h)), ("self_attn.q_proj.bias", (h,)),
            ("self_attn.k_proj.weight", (kv, h)), ("self_attn.k_proj.bias", (kv,)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.v_proj.bias", (kv,)),
            ("self_attn.o_proj.weight", (h, h)), ("mlp.gate_proj.weight", (f, h)),
            ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f))]]
    out += [("model.norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings"):
        out += [("lm_head.weight", (v, h))]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen) -> None:
    """One safetensors file: the header (all offsets known from the shapes), then each tensor's
    bytes generated slice by slice (N(0, 0.02) in bf16)."""
    import torch

    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # safetensors pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _, shape in tensors:
            left = _numel(shape)
            while left:
                k = min(left, SLICE_ELEMS)
                t = torch.randn(k, generator=gen, dtype=torch.bfloat16).mul_(0.02)
                f.write(t.view(torch.uint8).numpy().data)
                left -= k


def make_model(out: Path, num_layers: int) -> int:
    """Write the random HF checkpoint (shards + index + config.json); returns the shard bytes."""
    import torch

    cfg = json.loads(CONFIG.read_text())
    cfg["num_hidden_layers"] = num_layers
    shards: list[list] = [[]]
    size = 0
    for name, shape in model_tensors(cfg):
        n = _numel(shape) * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, ts in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / fname, ts, gen)
        for name, shape in ts:
            weight_map[name] = fname
            total += _numel(shape) * 2
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


# ---------------------------------------------------------------- measuring a child process


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _tree_rss(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes summed over ``pid`` and its descendants."""
    anon = fileb = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("RssFile:"):
                        fileb += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return anon, fileb


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def drop_caches(enabled: bool) -> bool:
    if not enabled:
        return False
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError as e:
        print(f"note: cannot drop the page cache ({e}); the steps may start warm", file=sys.stderr)
        return False


def measure(label: str, cmd: list[str], nbytes: int, caches: bool, env=None,
            may_fail: bool = False) -> dict | None:
    """Run ``cmd`` (a shell string or argv), polling its process tree's RSS. ``may_fail``: a
    non-zero exit is reported and skipped (None) instead of ending the benchmark."""
    dropped = drop_caches(caches)
    before = load()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, shell=isinstance(cmd, str))
    peak = peak_anon = peak_file = 0
    while True:
        anon, fileb = _tree_rss(proc.pid)
        if anon + fileb > peak:
            peak = anon + fileb
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, fileb)
        try:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        if may_fail:
            print(f"SKIPPED {label}: exited {proc.returncode}", flush=True)
            return None
        raise SystemExit(f"{label}: {cmd} exited {proc.returncode}")
    r = {"step": label, "wall_s": round(wall, 1), "bytes": nbytes,
         "mb_s": round(nbytes / 1e6 / wall, 1), "peak_tree_rss_gib": round(peak / 2**30, 2),
         "peak_tree_anon_gib": round(peak_anon / 2**30, 2),
         "peak_tree_file_gib": round(peak_file / 2**30, 2),
         "maxrss_gib": round(ru.ru_maxrss / 2**20, 2),
         "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "user_s": round(ru.ru_utime, 1),
         "load_before": before, "load_after": load(),
         "cold_cache": dropped, "cmd": cmd if isinstance(cmd, str) else " ".join(cmd)}
    print("RESULT " + json.dumps(r), flush=True)
    return r


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table(results: list[dict], copy_s: float | None) -> str:
    rows = ["| step | wall s | MB/s | peak RSS GiB (tree; anon + file-backed) | ru_maxrss GiB | vs copy "
            "| CPU s (user) | load 1-min before -> after |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{r['wall_s'] / copy_s:.2f}x" if copy_s else "-"
        rows.append(f"| {r['step']} | {r['wall_s']:.1f} | {r['mb_s']:.0f} | {r['peak_tree_rss_gib']:.2f} "
                    f"({r['peak_tree_anon_gib']:.2f} + {r['peak_tree_file_gib']:.2f}) | "
                    f"{r['maxrss_gib']:.2f} | {vs} | {r['cpu_s']:.0f} ({r['user_s']:.0f}) | "
                    f"{r['load_before'].split()[0]} -> "
                    f"{r['load_after'].split()[0]} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/work/bench_convert_tmp")
    ap.add_argument("--num_layers", type=int, default=28)
    ap.add_argument("--keep", action="store_true", help="keep the workdir (default: delete it)")
    ap.add_argument("--reuse", action="store_true", help="reuse a model already in workdir/hf")
    ap.add_argument("--steps", default="copy,convert,reshard",
                    help="comma list of copy, convert, reshard, reshard_torch, from_torch (after reshard_torch)")
    ap.add_argument("--reshard_torch", action="store_true", help="also torch_dist -> torch TP4/PP2")
    ap.add_argument("--no_drop_caches", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    steps = a.steps.split(",") + (["reshard_torch"] if a.reshard_torch else [])
    w = Path(a.workdir)
    hf, mc, rs, rt, cp = w / "hf", w / "mc", w / "rs", w / "rs_torch", w / "copy"
    caches = not a.no_drop_caches
    print(f"load before: {load()}", flush=True)
    if not (a.reuse and (hf / "config.json").is_file()):
        shutil.rmtree(w, ignore_errors=True)
        t = time.perf_counter()
        make_model(hf, a.num_layers)
        print(f"made {du(hf) / 2**30:.2f} GiB of random bf16 weights in {time.perf_counter() - t:.0f} s",
              flush=True)
    nbytes = du(hf)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results, copy_s = [], None
    try:
        if "copy" in steps:
            shutil.rmtree(cp, ignore_errors=True)
            r = measure("plain copy (cp -r + sync)", f"cp -r '{hf}' '{cp}' && sync", nbytes, caches)
            copy_s = r["wall_s"]
            results.append(r)
            shutil.rmtree(cp)
        if "convert" in steps:
            results.append(measure("HF -> mcore torch_dist", [
                py, "-m", "hpctrain.cli", "export", "--model", str(hf), "--to_mcore", "true",
                "--output_dir", str(mc), "--overwrite", "true", "--no_progress"], nbytes, caches, env))
        if "reshard" in steps:
            results.append(measure("reshard torch_dist -> torch_dist TP4/PP2 (+verify)", [
                py, "-m", "hpctrain.cli", "reshard", str(mc), "--tp", "4", "--pp", "2", "--out", str(rs),
                "--overwrite", "--no_progress"], du(mc), caches, env))
            shutil.rmtree(rs, ignore_errors=True)
        if "reshard_torch" in steps:  # --format torch is being added; skipped when refused
            r = measure("reshard torch_dist -> torch TP4/PP2 (+verify)", [
                py, "-m", "hpctrain.cli", "reshard", str(mc), "--tp", "4", "--pp", "2", "--out", str(rt),
                "--format", "torch", "--overwrite", "--no_progress"], du(mc), caches, env, may_fail=True)
            results += [r] if r else []
            if r and "from_torch" in steps:  # and back: a legacy input read stage by stage
                results.append(measure("reshard torch TP4/PP2 -> torch_dist (+verify)", [
                    py, "-m", "hpctrain.cli", "reshard", str(rt), "--tp", "2", "--pp", "1", "--out",
                    str(w / "rs_back"), "--overwrite", "--no_progress"], du(rt), caches, env))
                shutil.rmtree(w / "rs_back", ignore_errors=True)
            shutil.rmtree(rt, ignore_errors=True)
    finally:
        print(f"load after: {load()}", flush=True)
        print(table(results, copy_s), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"input_bytes": nbytes, "results": results}, indent=2))
        if not a.keep:
            shutil.rmtree(w, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
