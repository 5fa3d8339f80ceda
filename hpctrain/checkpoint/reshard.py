"""``hpctrain reshard CKPT --tp T --pp P [--ep E --etp T2] --out D [--format torch_dist|torch]``: offline, CPU only.

Formats, in and out (the input's is detected):

* ``torch_dist`` (megatron-core dist_checkpointing; what ``hpctrain sft/pt/export`` write). Its
  files hold GLOBAL tensors, so it loads at any TP/PP as it is; torch_dist -> torch_dist checks that
  the new layout fits the model and makes a verified copy of every tensor and object.
* ``torch``: megatron's legacy per-rank format, ``iter_*/mp_rank_{tp:02d}[_{pp:03d}]/
  model_optim_rng.pt`` (see hpctrain/checkpoint/legacy.py for what each file holds and how
  tensors are split over TP). torch_dist -> torch, torch -> torch_dist and torch -> torch at
  another TP/PP re-lay the weights with hpctrain.native's kernels.

Checks: TP must divide heads, query groups, ffn and the padded vocabulary (from config.json,
args.json or the legacy args, whichever the checkpoint has), PP the layers; for a MoE model EP the
experts and ETP the expert FFN. MoE checkpoints are torch_dist only (their experts are global tensors
there, so a change of EP is a verified copy, like a change of TP).

Optimizer state. Carried only where it stays valid: torch_dist -> torch_dist copies it, except the
distributed optimizer's ``dp_reshardable`` buffers (hpctrain's default) when TP or PP change: those
buffers follow the saved TP/PP layout and would not load at another. The legacy format never
receives optimizer state, and legacy optimizer state (``optimizer`` in the rank files or
``distrib_optim.pt``) is never read. In those cases the command refuses and says why, unless
``--no_optim`` is given: then it logs a warning and writes the weights, iteration, consumed samples
and LR-scheduler state only (the trainer then starts a fresh optimizer state: see docs/checkpoints.md).
RNG state is never written to the legacy format (it is per rank; the trainer skips it anyway when
the layout changed).

Memory bound: torch_dist output is written one tensor chunk (one layer of one tensor) at a time
(peak: about two such chunks, source and read-back, during verification); legacy output one rank
file at a time, each tensor of it read as just that rank's box(es) of a torch_dist source, so the
peak is about one output rank file (model / (TP*PP)) plus one rank-sized tensor. A legacy source
is memory-mapped, one pipeline stage's files at a time (the maps dropped after every 512 MiB read
through them), and merged one global layer tensor at a time with the native kernels. Every output
is read back and compared bit-exactly with the source before the tracker file is written (last,
atomically): an interrupted run never looks complete.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from hpctrain.checkpoint import convert_dcp as cd
from hpctrain.checkpoint import layout, legacy, safe_pickle
from hpctrain.checkpoint.formats import find_input
from hpctrain.checkpoint.output import Flags, staged_output
from hpctrain.checkpoint.match import is_optimizer_key
from hpctrain.model.mcore_config import check_ep, check_pp, check_tp
from hpctrain.progress import Progress

log = logging.getLogger(__name__)
NO_OPTIM = "pass --no_optim to write the weights without it (a resumed run then starts a new optimizer state)"


def command_line():
    from hpctrain.cli_args import CommandLine, Positional, flag

    return CommandLine("hpctrain reshard", __doc__.split("\n\n")[0], mode="reshard", flags=[
        flag("--tp", "--tensor_model_parallel_size", type=int, required=True, help="target TP size",
             config="parallel.tensor_model_parallel_size"),
        flag("--pp", "--pipeline_model_parallel_size", type=int, required=True, help="target PP size",
             config="parallel.pipeline_model_parallel_size"),
        flag("--ep", "--expert_model_parallel_size", type=int, default=1, config="moe.expert_model_parallel_size",
             help="target expert parallel size (MoE models; must divide num_experts)"),
        flag("--etp", "--expert_tensor_parallel_size", type=int, default=None,
             config="moe.expert_tensor_parallel_size",
             help="target expert tensor parallel size (MoE models; default: the TP size)"),
        flag("--out", "--output_dir", required=True, help="output checkpoint root"),
        flag("--format", "--ckpt_format", choices=("torch_dist", "torch"), default="torch_dist",
             config="checkpoint.ckpt_format",
             help="output format: torch_dist (megatron-core) or torch (legacy per-rank files)"),
        flag("--overwrite", "--exist_ok", kind="bool", default=False, help="replace an existing output"),
        flag("--no_optim", kind="bool", default=False,
             help="drop optimizer state that cannot be re-laid-out instead of refusing"),
        flag("--trust_pickle", kind="bool", default=False,
             help="load the input's pickles unrestricted (they may run code): only for a checkpoint "
                  "you trust whose files name classes outside the allow-list (e.g. Megatron-LM args)"),
        flag("--no_progress", kind="bool", default=False, help="no progress lines"),
    ], positionals=[Positional("ckpt", "checkpoint root (or save dir with v<N>-* versions, or an iter_* dir)",
                               config="model.load")])


# --- input --------------------------------------------------------------------------------
COMMON_OBJECT = "common_state"  # megatron-core >= 0.19 keeps the non-sharded state in this object, not common.pt


def _common(ref: layout.CheckpointRef) -> dict:
    """The non-sharded state (iteration, scheduler, ...): common.pt (megatron-core <= 0.18 and our
    writers), else megatron-core 0.19's common_state object, read by megatron-core itself."""
    f = ref.path / "common.pt"
    if f.is_file():
        return safe_pickle.load_torch(f)
    if any(k.startswith(COMMON_OBJECT) for k in cd.DcpReader(ref.path).keys()):
        from megatron.core import dist_checkpointing

        return dist_checkpointing.load_common_state_dict(str(ref.path))
    return {}


def dist_source(ref: layout.CheckpointRef) -> legacy.DistSource:
    common = _common(ref)
    reader = cd.DcpReader(ref.path)
    optim = [k for k in reader.keys() if is_optimizer_key(k)]
    meta = legacy.Meta(iteration=int(common.get("iteration", ref.iteration)), release=ref.release,
                       consumed_train_samples=int(common.get("consumed_train_samples", 0)),
                       opt_param_scheduler=common.get("opt_param_scheduler"),
                       optimizer=f"{len(optim)} optimizer entries ({optim[0]}, ...)" if optim else None)
    return legacy.DistSource(reader, meta)


def model_args(root: Path, src: legacy.Source) -> dict:
    """Shape arguments for the layout checks: config.json, else args.json's model, else legacy args."""
    if (root / "config.json").is_file():
        from hpctrain.model.build import model_args_from_hf
        from hpctrain.model.families import read_config_json

        pad = src.tensors.get(legacy.EMBED, ((None,),))[0][0]
        return model_args_from_hf(read_config_json(root / "config.json"), padded_vocab_size=pad,
                                  where=str(root / "config.json"))
    if (root / "args.json").is_file():
        m = json.loads((root / "args.json").read_text()).get("model") or {}
        if isinstance(m, dict) and m.get("num_attention_heads"):
            return {**m, "num_query_groups": m.get("num_query_groups") or m["num_attention_heads"]}
    return dict(src.meta.model_args)


def check_layout(root: Path, src: legacy.Source, tp: int, pp: int, ep: int = 1, etp: int | None = None) -> dict:
    """Refuse a TP/PP/EP/ETP that does not fit the model; returns the model arguments found."""
    args = model_args(root, src)
    args.setdefault("num_layers", src.num_layers)
    if legacy.EMBED in src.tensors:
        args["padded_vocab_size"] = src.tensors[legacy.EMBED][0][0]
    check_tp({k: args.get(k) for k in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                                       "padded_vocab_size")}, tp)
    check_pp({"num_layers": src.num_layers}, pp)
    check_ep(args, ep)
    ffn, etp = args.get("moe_ffn_hidden_size"), etp or tp
    if args.get("num_experts") and ffn and ffn % etp:
        raise ValueError(f"expert_tensor_parallel_size={etp} does not divide moe_ffn_hidden_size={ffn}; "
                         "pick an ETP that divides it")
    if not args.get("num_attention_heads"):
        log.warning("%s: no config.json/args.json/args with num_attention_heads: TP=%d checked against "
                    "the tensor shapes only", root, tp)
    return args


# --- the conversions ----------------------------------------------------------------------
def reshard(ckpt: str, tp: int, pp: int, out: str, overwrite: bool = False, progress: bool = True,
            fmt: str = "torch_dist", no_optim: bool = False, trust_pickle: bool = False, ep: int = 1,
            etp: int | None = None) -> layout.CheckpointRef:
    """Re-lay ``ckpt`` out at TP x PP (x EP x ETP for a MoE model) in ``out``. Its pickles are read
    through safe_pickle (a global outside the allow-list is refused) unless ``trust_pickle``."""
    with safe_pickle.trusted(trust_pickle):
        return _reshard(ckpt, (tp, pp, ep, etp or tp), out, overwrite, progress, fmt, no_optim)


def _reshard(ckpt: str, sizes: tuple, out: str, overwrite: bool, progress: bool, fmt: str,
             no_optim: bool) -> layout.CheckpointRef:
    tp, pp, ep, etp = sizes
    ref, kind = find_input(ckpt)
    src = dist_source(ref) if kind == "torch_dist" else legacy.LegacySource(ref.path)
    args = check_layout(ref.root, src, tp, pp, ep, etp)
    if args.get("num_experts") and (kind == "torch" or fmt == "torch"):
        raise ValueError(f"{ref.path}: a MoE model in Megatron-LM's legacy per-rank format is not built (its "
                         "expert files per EP rank are not written or read here): use --format torch_dist")
    src.meta.model_args = {**args, **src.meta.model_args}  # -> legacy args
    drop_optim = _optimizer_policy(ref, kind, src, fmt, sizes, no_optim)
    inputs = [ref.path] + [f for f in ref.root.iterdir() if f.is_file()]
    with staged_output(out, overwrite, inputs, Flags(out="--out", overwrite="--overwrite")) as dst_root:
        dst = layout.checkpoint_dir(dst_root, layout.RELEASE if ref.release else ref.iteration)
        if kind == "torch_dist" and fmt == "torch_dist":
            _dist_to_dist(ref, src, dst, drop_optim, progress)
        elif fmt == "torch":
            bar = Progress(tp * pp, "reshard", "rank files", enabled=progress)
            legacy.write_legacy(src, tp, pp, dst, on_file=lambda: bar.update(1))
            bar.close()
            verify_legacy(src, dst, tp, pp)
        else:
            _legacy_to_dist(src, dst, progress)
            verify_sources(src, dist_source(layout.CheckpointRef(dst_root, dst, ref.iteration, ref.release)))
        for f in ref.root.iterdir():  # config.json, tokenizer, args.json: what goes back to HF / resumes
            if f.is_file() and f.name != layout.TRACKER:
                shutil.copy2(f, dst_root / f.name)
        layout.write_tracker(dst_root, layout.RELEASE if ref.release else ref.iteration)
    return layout.complete_checkpoint(out)


def _optimizer_policy(ref, kind: str, src: legacy.Source, fmt: str, sizes: tuple, no_optim: bool) -> bool:
    """True when optimizer state is dropped (with a warning); raises when it would be lost silently."""
    found = src.meta.optimizer
    if not found:
        return False
    why = None
    if kind == "torch":
        why = "legacy optimizer state is not re-laid-out"
    elif fmt == "torch":
        why = "the legacy format is written with weights only"
    else:
        saved = (_common(ref).get("hpctrain") or {}).get("layout") or {}
        was = (saved.get("tp"), saved.get("pp"), saved.get("ep", 1), saved.get("etp", saved.get("tp")))
        distributed = any(".distributed." in k for k in src.reader.keys() if is_optimizer_key(k))
        if distributed and was != tuple(sizes):
            why = (f"the distributed optimizer's dp_reshardable buffers follow the saved layout "
                   f"TP={was[0]} PP={was[1]} EP={was[2]} ETP={was[3]} and would not load at TP={sizes[0]} "
                   f"PP={sizes[1]} EP={sizes[2]} ETP={sizes[3]} (save with use_distributed_optimizer=false for "
                   "per-parameter optimizer state, which any layout loads)")
    if why is None:
        return False
    if not no_optim:
        raise ValueError(f"{ref.path} holds optimizer state ({found}) that cannot be carried over: "
                         f"{why}; {NO_OPTIM}")
    log.warning("%s: dropping optimizer state (%s): %s", ref.path, found, why)
    return True


def _dist_to_dist(ref, src: legacy.DistSource, dst: Path, drop_optim: bool, progress: bool) -> None:
    reader = src.reader

    def keep(k: str) -> bool:  # the common state goes to common.pt below, which every version reads first
        return not k.startswith(COMMON_OBJECT) and not (drop_optim and is_optimizer_key(k))

    items = [it for it in _copy_items(reader) if keep(it.key)]
    bar = Progress(len(items), "reshard", "tensors", enabled=progress)
    cd.write_dcp(dst, items, common=None, on_item=lambda it: bar.update(1))
    bar.close()
    common = _common(ref)  # not {}: keep the trainer's progress and scheduler
    if drop_optim:  # and say there is no optimizer state
        common.pop("optimizer", None)
        common.setdefault("hpctrain", {}).setdefault("content", {})["optimizer"] = False
    torch.save(common, dst / "common.pt")
    verify(reader, cd.DcpReader(dst), keys=[k for k in reader.keys() if keep(k)])


def _legacy_to_dist(src: legacy.Source, dst: Path, progress: bool) -> None:
    items: list = []
    for key, (shape, dt) in src.tensors.items():
        if not key.startswith(legacy.LAYERS):
            items.append(cd.LazyChunk(key, shape, (0,) * len(shape), shape, dt,
                                      lambda k=key: src.get(k, None)))
    for i in range(src.num_layers):  # layer by layer: the source reads one stage's files at a time
        for key, (shape, dt) in src.tensors.items():
            if key.startswith(legacy.LAYERS):
                items.append(cd.LazyChunk(key, shape, (i,) + (0,) * (len(shape) - 1), (1,) + shape[1:], dt,
                                          lambda k=key, i=i: src.get(k, i).unsqueeze(0)))
    for mod in src.extra_state:
        for i in range(src.num_layers):
            key = cd.sharded_object_key(f"{legacy.LAYERS}{mod}{legacy.EXTRA}", (i,), (src.num_layers,))
            items.append(cd.LazyBytes(key, cd.none_bytes))
    bar = Progress(len(items), "reshard", "tensors", enabled=progress)
    m = src.meta
    common = {"iteration": m.iteration, "consumed_train_samples": m.consumed_train_samples,
              "hpctrain": {"format": 1, "content": {"model": True, "optimizer": False, "rng": False},
                           "layout": {}, "num_model_chunks": 1, "extra": {}}}
    if m.opt_param_scheduler is not None:
        common["opt_param_scheduler"] = m.opt_param_scheduler
    if m.release:
        common = {}  # a release checkpoint (converted weights) carries no training state
    cd.write_dcp(dst, items, common=common, on_item=lambda it: bar.update(1))
    bar.close()


def _copy_items(reader: cd.DcpReader) -> list:
    items: list = []
    for key, md in reader.metadata.state_dict_metadata.items():
        if key in reader.tensor_keys():
            for c in md.chunks:
                off, size = tuple(c.offsets), tuple(c.sizes)
                items.append(cd.LazyChunk(key, tuple(md.size), off, size, md.properties.dtype,
                                          lambda k=key, o=off, s=size: reader.read(k, o, s)))
        else:
            items.append(cd.LazyBytes(key, lambda k=key: reader.read_bytes(k)))
    return items


# --- verification -------------------------------------------------------------------------
def verify(a: cd.DcpReader, b: cd.DcpReader, keys: list[str] | None = None) -> None:
    """Every tensor chunk and object of ``a`` (or its ``keys``) is bit-identical in ``b``."""
    keys = sorted(a.keys() if keys is None else keys)
    if keys != sorted(b.keys()):
        raise RuntimeError(f"verify: {b.path} has different keys than {a.path}")
    tensors = set(a.tensor_keys())
    for key in keys:
        if key in tensors:
            for c in a.chunks(key):
                off, size = tuple(c.offsets), tuple(c.sizes)
                if not torch.equal(a.read(key, off, size), b.read(key, off, size)):
                    raise RuntimeError(f"verify: {key} at {off} differs in {b.path}")
        elif a.read_bytes(key).getvalue() != b.read_bytes(key).getvalue():
            raise RuntimeError(f"verify: object {key} differs in {b.path}")


def _same_structure(a: legacy.Source, b: legacy.Source, where) -> None:
    if a.tensors != b.tensors:
        diff = sorted(set(a.tensors.items()) ^ set(b.tensors.items()), key=str)
        raise RuntimeError(f"verify: {where} has other tensors/shapes than the source, e.g. {diff[:3]}")
    if a.extra_state != b.extra_state or a.meta.tied != b.meta.tied:
        raise RuntimeError(f"verify: {where}: extra-state modules or tied embeddings differ from the source")


def verify_sources(a: legacy.Source, b: legacy.Source) -> None:
    """Every global tensor of ``a`` is bit-identical in ``b`` (one layer of one tensor at a time)."""
    where = getattr(b, "path", None) or b.reader.path
    _same_structure(a, b, where)
    for key, layer in a.items():
        if not torch.equal(a.get(key, layer), b.get(key, layer)):
            raise RuntimeError(f"verify: {key} (layer {layer}) differs in {where}")


def verify_legacy(src: legacy.Source, path: Path, tp: int, pp: int) -> None:
    """Read the rank files back, one at a time: the layout is TP x PP, the global view matches the
    source's, and every tensor of every rank is bit-identical to the source's part for that rank."""
    out = legacy.LegacySource(path)
    _same_structure(src, out, path)
    if (out.tp, out.pp) != (tp, pp):
        raise RuntimeError(f"verify: {path} holds TP={out.tp} PP={out.pp}, expected TP={tp} PP={pp}")
    del out  # its memory maps: verification opens one rank file at a time instead
    seen = set()
    for p, layers in enumerate(legacy.stage_layers(src.num_layers, pp)):
        for t in range(tp):
            # A fresh map per file, dropped after it: pages read from a mapped file count in our
            # RSS until the map goes, so keeping a stage's TP files open would hold TP rank files.
            model = legacy.load_rank_file(path / legacy.rank_dir(t, p, pp) / legacy.FILE)["model"]
            for name, v in model.items():
                if v is None:
                    continue
                key, layer = legacy.global_name(name, layers.start)
                if key == legacy.OUTPUT and src.meta.tied:
                    key = legacy.EMBED  # the last stage's copy of tied embeddings
                if not torch.equal(v, src.get_shard(key, layer, tp, t)):
                    raise RuntimeError(f"verify: {name} of {legacy.rank_dir(t, p, pp)} differs from the source")
                seen.add((key, layer))
            del model
    missing = set(src.items()) - seen
    if missing:
        raise RuntimeError(f"verify: {path} lacks {len(missing)} source tensors, e.g. {sorted(missing, key=str)[:3]}")


def run(argv: list[str]) -> int:
    a = command_line().parse(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        ref = reshard(a.ckpt, a.tp, a.pp, a.out, a.overwrite, not a.no_progress, a.format, a.no_optim,
                      a.trust_pickle, a.ep, a.etp)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"hpctrain reshard: {e}", file=sys.stderr)
        return 1
    where = "loads at any TP/PP/EP" if a.format == "torch_dist" else f"TP={a.tp} PP={a.pp} rank files"
    print(f"wrote {ref.path} ({a.format}, verified; {where})")
    return 0
