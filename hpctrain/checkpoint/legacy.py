"""megatron's legacy per-rank ``torch`` checkpoint format, read and written tensor by tensor.

On disk (Megatron-LM ``--ckpt-format torch``)::

    <root>/latest_checkpointed_iteration.txt             "100" or "release" (written LAST)
    <root>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   (``_{pp:03d}`` only when PP > 1)

Each file is the dict ``{'model': GPTModel.state_dict() of that (TP, PP) rank, 'checkpoint_version':
3.0, 'iteration': N, 'args': argparse.Namespace(...), ['opt_param_scheduler': {...}]}``. What we
write mirrors what megatron-core 0.16.1's GPTModel holds with the local / portable layer spec
(tests/checkpoint/test_ckpt_reshard_legacy.py compares it with a real TP=2 x PP=2 model):

* layer numbers are LOCAL to the pipeline stage (``decoder.layers.0 .. L/PP-1``);
* the norms are their own modules: ``input_layernorm.weight``, ``pre_mlp_layernorm.weight``
  (Transformer Engine's fused names ``linear_qkv.layer_norm_weight`` are accepted on input);
* each TP linear has an ``_extra_state`` entry (``None``), ``output_layer`` included;
* the first stage holds ``embedding.word_embeddings.weight``, the last ``decoder.final_layernorm``
  and ``output_layer.weight``; with tied embeddings and PP > 1 the last stage holds its own copy of
  the word embeddings as ``output_layer.weight`` (megatron-core keeps one there and all-reduces
  its gradient with the first stage's), with PP = 1 there is no ``output_layer.weight``.

TP sharding (megatron-core's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding):
``linear_qkv`` weight and bias split along dim 0 (the mcore rows are already grouped per query
group, so a contiguous split is right); gated ``linear_fc1`` gives rank r ``[gate_r; up_r]``;
``linear_proj`` / ``linear_fc2`` weights split along dim 1, their biases are replicated; word
embeddings and ``output_layer`` split the (padded) vocabulary along dim 0; norms are replicated.

The global view used in between is the torch_dist one: layer tensors stacked on a leading axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, ...]``), norms under their
fused names. ``Source`` is that view over either format; ``write_legacy`` writes one rank file at
a time from any ``Source``; ``LegacySource`` rebuilds global tensors from rank files that are
memory-mapped (``torch.load(mmap=True, weights_only=True)``), so nothing is read until asked for.
Re-layout copies go through hpctrain.native's kernels (split / concat / gated); from a torch_dist
source, a rank's part is instead read straight from the file as one box (two for gated fc1), which
needs no intermediate full tensor.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hpctrain.checkpoint import convert_dcp as cd
from hpctrain.checkpoint import layout, safe_pickle
from hpctrain.native import relayout

log = logging.getLogger(__name__)

FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
LAYERS = "decoder.layers."
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# global (torch_dist, fused-norm) layer suffix -> the local/portable spec's module name
LOCAL_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
               "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias"}
GLOBAL_NAMES = {v: k for k, v in LOCAL_NAMES.items()}
EXTRA = "._extra_state"


# --- TP rules -------------------------------------------------------------------------------
def tp_rule(key: str, gated: bool) -> str:
    """How megatron-core shards global tensor ``key`` over TP: dup | col | row | gated."""
    name = key[len(LAYERS):] if key.startswith(LAYERS) else key
    if key in (EMBED, OUTPUT):
        return "col"                       # VocabParallelEmbedding / ColumnParallelLinear (vocab)
    if "layernorm" in name or "layer_norm" in name or key == "embedding.position_embeddings.weight":
        return "dup"
    if name in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return "col"
    if name in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
        return "gated" if gated else "col"
    if name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return "row"
    if name in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
        return "dup"                       # RowParallelLinear adds its bias after the all-reduce
    raise ValueError(f"{key}: no TP sharding rule for this tensor (supported: GPT decoders with "
                     "linear_qkv/linear_proj/linear_fc1/linear_fc2, norms, embeddings, output_layer)")


def _dim(rule: str) -> int:
    return 1 if rule == "row" else 0


def shard(full: torch.Tensor, rule: str, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s part of global tensor ``full`` (native copy)."""
    full = full.contiguous()
    if rule == "dup" or tp == 1:
        return full.clone()
    if rule == "gated":
        f = full.shape[0] // 2
        out = torch.empty((full.shape[0] // tp,) + tuple(full.shape[1:]), dtype=full.dtype)
        relayout.gated_mlp_to_mcore(full[:f], full[f:], tp, rank, out=out)
        return out
    d = _dim(rule)
    shape = list(full.shape)
    shape[d] //= tp
    out = torch.empty(shape, dtype=full.dtype)
    relayout.shard_dim(full, d, tp, rank, out=out)
    return out


def unshard(parts: list[torch.Tensor], rule: str) -> torch.Tensor:
    """The global tensor from TP parts in rank order (native copy)."""
    tp = len(parts)
    parts = [p.contiguous() for p in parts]
    if rule == "dup" or tp == 1:
        for r, p in enumerate(parts[1:], 1):
            if not torch.equal(p, parts[0]):
                raise ValueError(f"replicated tensor differs between TP rank 0 and TP rank {r}")
        return parts[0].clone()
    if rule == "gated":
        n = parts[0].shape[0] // 2
        out = torch.empty((2 * n * tp,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
        for r, p in enumerate(parts):
            relayout.gated_mlp_from_mcore(p, tp, r, out[: n * tp], out[n * tp:])
        return out
    d = _dim(rule)
    shape = list(parts[0].shape)
    shape[d] = sum(p.shape[d] for p in parts)
    out = torch.empty(shape, dtype=parts[0].dtype)
    relayout.concat_dim(parts, d, out=out)
    return out


# --- the global view ----------------------------------------------------------------------
@dataclass
class Meta:
    """What travels besides the weights."""

    iteration: int
    release: bool
    consumed_train_samples: int = 0
    opt_param_scheduler: dict | None = None
    model_args: dict = field(default_factory=dict)   # num_attention_heads, ... where known
    optimizer: str | None = None                     # description of optimizer state found, if any
    tied: bool = False


class Source:
    """Global tensors of a checkpoint: ``tensors`` maps key -> (shape, dtype); layer keys (under
    ``decoder.layers.``) are stacked ``[num_layers, ...]``; ``get(key, layer)`` returns one layer's
    slice (``layer=None`` for the others). ``extra_state`` lists the layer modules with an
    ``_extra_state`` entry (e.g. ``self_attention.linear_qkv``)."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    extra_state: list[str]
    num_layers: int
    meta: Meta

    def get(self, key: str, layer: int | None) -> torch.Tensor:
        raise NotImplementedError

    def get_shard(self, key: str, layer: int | None, tp: int, rank: int) -> torch.Tensor:
        """TP rank ``rank``'s part of ``get(key, layer)`` (megatron-core's split of that tensor)."""
        return shard(self.get(key, layer), tp_rule(key, self.gated), tp, rank)

    @property
    def gated(self) -> bool:
        fc1, fc2 = (self.tensors.get(LAYERS + f"mlp.linear_fc{i}.weight") for i in (1, 2))
        return bool(fc1 and fc2 and fc1[0][1] == 2 * fc2[0][2])

    def items(self):
        """(key, layer-or-None) of every tensor, layers in order."""
        for k in self.tensors:
            if k.startswith(LAYERS):
                for i in range(self.num_layers):
                    yield k, i
            else:
                yield k, None


class DistSource(Source):
    """A torch_dist checkpoint's model tensors (optimizer / RNG objects are only noted in meta)."""

    def __init__(self, reader: cd.DcpReader, meta: Meta):
        self.reader, self.meta = reader, meta
        self.tensors = {k: (reader.shape(k), reader.dtype(k)) for k in reader.tensor_keys()
                        if not k.startswith("optimizer.")}
        self.num_layers = next((s[0] for k, (s, _) in self.tensors.items() if k.startswith(LAYERS)), 0)
        self.extra_state = sorted({k.split(EXTRA)[0][len(LAYERS):] for k in reader.keys()
                                   if k.startswith(LAYERS) and EXTRA + "/" in k})
        self.meta.tied = OUTPUT not in self.tensors

    def get(self, key, layer):
        shape = self.tensors[key][0]
        if layer is None:
            return self.reader.read(key)
        return self.reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]

    def get_shard(self, key, layer, tp, rank):
        """Reads only the rank's box(es) of the stored tensor: no full tensor in memory."""
        rule = tp_rule(key, self.gated)
        if rule == "dup" or tp == 1:
            return self.get(key, layer)
        shape = self.tensors[key][0]
        lead = () if layer is None else (layer,)
        local = list(shape[len(lead):])
        d = _dim(rule)
        local[d] //= tp
        out = torch.empty(local, dtype=self.tensors[key][1])
        n = local[d]
        if rule == "gated":  # [gate_r; up_r]: rows r*n/2.. of the gate half and of the up half
            h, half = n // 2, shape[len(lead)] // 2
            for k, start in enumerate((rank * h, half + rank * h)):
                self._box(key, lead, shape, 0, start, h, out[k * h:(k + 1) * h])
        else:
            self._box(key, lead, shape, d, rank * n, n, out)
        return out

    def _box(self, key, lead, shape, d, start, n, out):
        off = [0] * len(shape)
        size = list(shape)
        if lead:
            off[0], size[0] = lead[0], 1
        off[len(lead) + d], size[len(lead) + d] = start, n
        self.reader.read(key, off, size, out=out.view(size))


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")


def find_rank_files(path: Path) -> tuple[int, int]:
    """(TP, PP) of a legacy checkpoint directory; every rank file must be there."""
    ranks = set()
    for d in path.iterdir():
        m = _RANK_RE.match(d.name)
        if m and d.is_dir():
            ranks.add((int(m.group(1)), int(m.group(2) or 0)))
        elif d.name.startswith("mp_rank_"):
            raise ValueError(f"{d}: unsupported rank directory name (expert-parallel or other "
                             "layouts are not supported; expected mp_rank_XX or mp_rank_XX_YYY)")
    if not ranks:
        raise FileNotFoundError(f"{path}: no mp_rank_* directories (not a legacy torch checkpoint)")
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    for t in range(tp):
        for p in range(pp):
            f = path / rank_dir(t, p, pp) / FILE
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: a legacy checkpoint at TP={tp} PP={pp} "
                                        f"needs all {tp * pp} rank files; the checkpoint is incomplete")
    return tp, pp


def load_rank_file(f: Path, trust_pickle: bool = False) -> dict:
    """One rank file, memory-mapped (tensors are read when touched), through safe_pickle.load_torch
    (torch's weights_only unpickler; Megatron-LM's ``args`` Namespace is allowed).

    Megatron-LM's args can also hold its own enums/classes, which are refused with the global
    named; ``trust_pickle`` (--trust_pickle) then loads with weights_only=False, which runs code
    from the file: only for files you trust.
    """
    with safe_pickle.trusted(trust_pickle or safe_pickle.is_trusted()):
        return safe_pickle.load_torch(f, mmap=True)


class _RankFiles:
    """``files[(tp, pp)]``: rank files loaded on first use; only one stage's stay referenced, so the
    memory maps of the others are released (and their pages stop counting as ours). Within a stage
    the maps are also dropped (and reopened on the next access) once ``MAP_BUDGET`` bytes have been
    read through them: every page read from a mapped file counts in our RSS while the map lives,
    so a large stage read end to end would otherwise hold all of it."""

    MAP_BUDGET = 512 * 2**20

    def __init__(self, path: Path, pp: int, trust_pickle: bool):
        self.path, self.pp, self.trust = path, pp, trust_pickle
        self._stage, self._open, self._read = None, {}, 0

    def __getitem__(self, rank: tuple[int, int]) -> dict:
        t, p = rank
        if p != self._stage:
            self._stage, self._open = p, {}
        if t not in self._open:
            self._open[t] = load_rank_file(self.path / rank_dir(t, p, self.pp) / FILE, self.trust)
        return self._open[t]

    def read(self, nbytes: int) -> None:
        """Account ``nbytes`` copied out of the maps; past the budget, drop them."""
        self._read += nbytes
        if self._read >= self.MAP_BUDGET:
            self._open, self._read = {}, 0


def _args_dict(args) -> dict:
    if args is None:
        return {}
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


class LegacySource(Source):
    """Global tensors of a legacy per-rank checkpoint directory (iter_*/release)."""

    def __init__(self, path: Path, trust_pickle: bool = False):
        self.path = path
        self.tp, self.pp = find_rank_files(path)
        self.files = _RankFiles(path, self.pp, trust_pickle)
        for p in range(self.pp):
            for t in range(self.tp):
                sd = self.files[(t, p)]
                if not isinstance(sd.get("model"), dict):
                    extra = [k for k in sd if k.startswith("model")]
                    raise ValueError(f"{path / rank_dir(t, p, self.pp) / FILE}: no 'model' state dict"
                                     + (f" (found {extra}: virtual pipeline chunks are not supported)"
                                        if extra else ""))
        first = self.files[(0, 0)]
        args = _args_dict(first.get("args"))
        self._layers = self._stage_layers()
        self.num_layers = sum(self._layers)
        self.meta = Meta(iteration=int(first.get("iteration", 0)), release=path.name == layout.RELEASE,
                         consumed_train_samples=int(args.get("consumed_train_samples", 0) or 0),
                         opt_param_scheduler=first.get("opt_param_scheduler"), model_args=args,
                         optimizer=self._optimizer_state())
        self._index()
        self.meta.tied = OUTPUT not in self.tensors  # _index skips the last stage's tied copy

    def _stage_layers(self) -> list[int]:
        counts = []
        for p in range(self.pp):
            idx = {int(m.group(1)) for k in self.files[(0, p)]["model"] if (m := _LAYER_RE.match(k))}
            if idx != set(range(len(idx))):
                raise ValueError(f"{self.path / rank_dir(0, p, self.pp)}: layer numbers {sorted(idx)} "
                                 "are not 0..n-1 (layer numbers must be local to the stage)")
            counts.append(len(idx))
        return counts

    def _optimizer_state(self) -> str | None:
        found = ["'optimizer' in the rank files"] if self.files[(0, 0)].get("optimizer") else []
        if any(self.path.glob("mp_rank_*/distrib_optim.pt")):
            found.append("distributed optimizer files (distrib_optim.pt)")
        return ", ".join(found) or None

    def _index(self) -> None:
        """Global shapes from TP rank 0 of each stage (the split dim times TP)."""
        self.tensors, self._where, extra = {}, {}, set()
        for p in range(self.pp):
            for name, t in self.files[(0, p)]["model"].items():
                m = _LAYER_RE.match(name)
                if name.endswith(EXTRA) or t is None:
                    if m:
                        extra.add(m.group(2)[: -len(EXTRA)])
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{self.path}: model entry {name} is a {type(t).__name__}, "
                                     "expected a tensor")
                if m:
                    key = LAYERS + GLOBAL_NAMES.get(m.group(2), m.group(2))
                    self._where.setdefault(key, {})[p] = m.group(2)
                elif name == OUTPUT and p == self.pp - 1 and self.pp > 1 and \
                        EMBED in self.files[(0, 0)]["model"] and self._is_tied_copy():
                    continue  # the last stage's copy of tied embeddings
                else:
                    key = name
                    self._where[key] = {p: name}
                if key not in self.tensors:
                    self.tensors[key] = (tuple(t.shape), t.dtype)
        gated = self.gated_local()
        for key, (shape, dt) in list(self.tensors.items()):
            rule = tp_rule(key, gated)
            shape = list(shape)
            if rule != "dup":
                shape[_dim(rule)] *= self.tp
            if key.startswith(LAYERS):
                shape = [self.num_layers] + shape
            self.tensors[key] = (tuple(shape), dt)
        self.extra_state = sorted(extra)

    def gated_local(self) -> bool:
        sd = self.files[(0, 0)]["model"]
        fc1, fc2 = sd.get("decoder.layers.0.mlp.linear_fc1.weight"), sd.get("decoder.layers.0.mlp.linear_fc2.weight")
        args = self._args_first()
        if "swiglu" in args:
            return bool(args["swiglu"])
        return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]

    def _args_first(self) -> dict:
        return _args_dict(self.files[(0, 0)].get("args"))

    def _is_tied_copy(self) -> bool:
        args = self._args_first()
        if "untie_embeddings_and_output_weights" in args:
            return not args["untie_embeddings_and_output_weights"]
        emb = self.files[(0, 0)]["model"][EMBED]
        out = self.files[(0, self.pp - 1)]["model"][OUTPUT]
        return emb.shape == out.shape and torch.equal(emb, out)

    def get(self, key, layer):
        where = self._where[key]
        if layer is None:
            (p, name), = where.items()
        else:
            p, j = self._locate(layer)
            name = f"decoder.layers.{j}.{where[p]}"
        parts = [self.files[(t, p)]["model"][name] for t in range(self.tp)]
        try:
            full = unshard(parts, tp_rule(key, self.gated))
        except ValueError as e:
            raise ValueError(f"{self.path / rank_dir(0, p, self.pp)}: {name}: {e}") from None
        self.files.read(sum(x.numel() * x.element_size() for x in parts))
        return full

    def _locate(self, layer: int) -> tuple[int, int]:
        start = 0
        for p, n in enumerate(self._layers):
            if layer < start + n:
                return p, layer - start
            start += n
        raise IndexError(layer)


# --- writing ------------------------------------------------------------------------------
def global_name(name: str, first_layer: int) -> tuple[str, int | None]:
    """(global key, global layer or None) of a rank file's entry in a stage starting at ``first_layer``."""
    m = _LAYER_RE.match(name)
    if not m:
        return name, None
    return LAYERS + GLOBAL_NAMES.get(m.group(2), m.group(2)), first_layer + int(m.group(1))


def stage_layers(num_layers: int, pp: int) -> list[range]:
    n = num_layers // pp
    return [range(p * n, (p + 1) * n) for p in range(pp)]


def rank_state_dict(src: Source, tp: int, pp: int, t: int, p: int) -> dict:
    """The ``model`` state dict of TP rank ``t``, PP stage ``p`` (what GPTModel.state_dict() holds)."""
    sd: dict = {}
    first, last = p == 0, p == pp - 1

    def put(name, key, layer=None):
        sd[name] = src.get_shard(key, layer, tp, t)

    if first:
        for key in src.tensors:
            if key.startswith("embedding."):
                put(key, key)
    for j, i in enumerate(stage_layers(src.num_layers, pp)[p]):
        for key in src.tensors:
            if key.startswith(LAYERS):
                suffix = key[len(LAYERS):]
                put(f"decoder.layers.{j}.{LOCAL_NAMES.get(suffix, suffix)}", key, i)
        for mod in src.extra_state:
            sd[f"decoder.layers.{j}.{mod}{EXTRA}"] = None
    if last:
        for key in src.tensors:
            if key.startswith("decoder.") and not key.startswith(LAYERS):
                put(key, key)
        if OUTPUT in src.tensors:
            put(OUTPUT, OUTPUT)
        elif pp > 1:
            put(OUTPUT, EMBED)  # megatron-core's last stage keeps a copy of tied embeddings
        sd["output_layer" + EXTRA] = None
    return sd


def legacy_args(src: Source, tp: int, pp: int) -> argparse.Namespace:
    """Megatron-LM-style args: the layout written, the model shape where known, the progress."""
    a = {k: v for k, v in src.meta.model_args.items() if isinstance(v, (int, float, str, bool, type(None)))}
    a.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, num_layers=src.num_layers,
             untie_embeddings_and_output_weights=not src.meta.tied, swiglu=src.gated,
             padded_vocab_size=src.tensors[EMBED][0][0] if EMBED in src.tensors else None,
             iteration=src.meta.iteration, consumed_train_samples=src.meta.consumed_train_samples,
             ckpt_format="torch")
    return argparse.Namespace(**a)


def write_legacy(src: Source, tp: int, pp: int, path: Path, on_file: Callable | None = None) -> None:
    """Write every rank file of ``path`` (an iter_*/release dir), one rank file in memory at a time."""
    args = legacy_args(src, tp, pp)
    for p in range(pp):
        for t in range(tp):
            state = {"model": rank_state_dict(src, tp, pp, t, p), "checkpoint_version": CHECKPOINT_VERSION,
                     "iteration": src.meta.iteration, "args": args}
            if src.meta.opt_param_scheduler is not None:
                state["opt_param_scheduler"] = src.meta.opt_param_scheduler
            d = path / rank_dir(t, p, pp)
            d.mkdir(parents=True, exist_ok=True)
            torch.save(state, d / FILE)
            del state
            if on_file is not None:
                on_file()
