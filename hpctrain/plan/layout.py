"""Parallel layout: TP x PP x CP x DP (+ virtual pipeline stages) for a world of GPUs.

``check_layout`` returns every reason a layout cannot run, each with its formula, e.g.
``tp(2) * pp(4) * cp(1) * dp(?) != 36 GPUs (3 nodes x 12): 36 is not divisible by tp*pp*cp = 8``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hpctrain.plan.shape import ModelShape


class LayoutError(ValueError):
    """A layout that cannot run; ``problems`` lists each broken rule with its formula."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("impossible layout:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class Cluster:
    """The allocation: nodes x GPUs per node."""

    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes({self.nodes}) and gpus_per_node({self.gpus_per_node}) must be >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return f"{self.world_size} GPUs ({self.nodes} nodes x {self.gpus_per_node})"


@dataclass(frozen=True)
class Batch:
    """What the batch rules and the activation estimate need from [train]/[data]/[parallel]."""

    micro_batch_size: int = 1
    global_batch_size: int = 16
    seq_length: int = 2048
    sequence_parallel: bool = False
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None


@dataclass(frozen=True)
class Layout:
    """One parallel layout. dp is derived: world / (tp * pp * cp)."""

    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None = None
    ep: int = 1                # expert parallel (MoE): experts split over EP ranks
    etp: int | None = None     # expert tensor parallel (MoE; None = tp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts (megatron-core: world / (pp * ep * etp))."""
        return max(1, self.world_size // (self.pp * self.ep * self.expert_tp))

    def describe(self) -> str:
        v = f" vpp={self.vpp}" if self.vpp else ""
        e = f" EP={self.ep} ETP={self.expert_tp}" if self.ep > 1 or self.etp else ""
        return f"TP={self.tp} PP={self.pp} CP={self.cp} DP={self.dp}{v}{e}"


@dataclass
class LayoutCheck:
    layout: Layout | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def make_layout(cluster: Cluster, tp: int, pp: int, cp: int, vpp: int | None = None) -> LayoutCheck:
    """Derive DP from the world size; refuse (with the formula) if tp*pp*cp does not divide it."""
    for name, v in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(v, int) or v < 1:
            return LayoutCheck(None, [f"{name}({v}) must be a positive integer"])
    world, model_par = cluster.world_size, tp * pp * cp
    if world % model_par:
        return LayoutCheck(None, [
            f"tp({tp}) * pp({pp}) * cp({cp}) * dp(?) != {cluster.describe()}: "
            f"{world} is not divisible by tp*pp*cp = {model_par}"])
    return LayoutCheck(Layout(tp, pp, cp, world // model_par, vpp))


def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Transformer layers on each pipeline stage (even split; optional custom first/last stage)."""
    if pp == 1:
        return [num_layers]
    head = [first] if first is not None else []
    tail = [last] if last is not None else []
    middle_stages = pp - len(head) - len(tail)
    rest = num_layers - sum(head) - sum(tail)
    if middle_stages <= 0:
        return head + tail
    return head + [rest // middle_stages] * middle_stages + tail


def _pipeline_problems(shape: ModelShape, lay: Layout, batch: Batch) -> list[str]:
    L, pp, vpp = shape.num_layers, lay.pp, lay.vpp
    first, last = batch.decoder_first_pipeline_num_layers, batch.decoder_last_pipeline_num_layers
    out = []
    if vpp is not None and vpp > 1 and pp == 1:
        out.append(f"virtual_pipeline_model_parallel_size({vpp}) needs pp > 1, got pp({pp})")
    if first is None and last is None:
        chunks = pp * (vpp or 1)
        if L % chunks:
            formula = f"pp({pp}) * vpp({vpp})" if vpp else f"pp({pp})"
            out.append(f"num_layers({L}) % {formula} = {L % chunks} != 0: layers must split evenly "
                       f"over pipeline stages")
        return out
    custom = (first or 0) + (last or 0)
    middle = pp - (first is not None) - (last is not None)
    rest = L - custom
    if rest < 0 or middle < 0 or (middle == 0 and rest != 0) or (middle > 0 and rest % middle):
        out.append(f"(num_layers({L}) - first({first or 0}) - last({last or 0})) % middle stages({max(middle, 0)}) "
                   f"!= 0: the remaining layers must split evenly over pp({pp}) minus the custom stages")
    return out


def _expert_problems(shape: ModelShape, lay: Layout) -> list[str]:
    ep, etp, out = lay.ep, lay.expert_tp, []
    if not shape.num_experts:
        if ep > 1 or lay.etp:
            out.append(f"expert_model_parallel_size({ep}) / expert_tensor_parallel_size need a MoE model "
                       "(this one has no experts)")
        return out
    if shape.num_experts % ep:
        out.append(f"num_experts({shape.num_experts}) % ep({ep}) = {shape.num_experts % ep} != 0: experts must "
                   "split evenly over EP ranks")
    if shape.moe_ffn_hidden_size % etp:
        out.append(f"moe_ffn_hidden_size({shape.moe_ffn_hidden_size}) % etp({etp}) != 0")
    if lay.world_size % (lay.pp * ep * etp):
        out.append(f"world({lay.world_size}) % (pp({lay.pp}) * ep({ep}) * etp({etp})) != 0: each pipeline stage's "
                   "experts are split over ETP x EP ranks")
    return out


def check_layout(shape: ModelShape, cluster: Cluster, lay: Layout, batch: Batch) -> LayoutCheck:
    """Every rule the layout breaks (with its formula), plus warnings that do not stop the run."""
    res = LayoutCheck(lay)
    p = res.problems
    tp, cp, dp = lay.tp, lay.cp, lay.dp
    if shape.num_attention_heads % tp:
        p.append(f"num_attention_heads({shape.num_attention_heads}) % tp({tp}) = "
                 f"{shape.num_attention_heads % tp} != 0: attention heads must split evenly over TP ranks")
    if shape.num_query_groups % tp:
        p.append(f"num_query_groups({shape.num_query_groups}) % tp({tp}) = {shape.num_query_groups % tp} != 0: "
                 f"key/value heads must split evenly over TP ranks")
    if shape.vocab_size % tp:
        p.append(f"vocab_size({shape.vocab_size}) % tp({tp}) = {shape.vocab_size % tp} != 0: the vocabulary "
                 f"must split evenly over TP ranks (set padded_vocab_size to a multiple of {tp})")
    p.extend(_pipeline_problems(shape, lay, batch))
    if cp > 1 and batch.seq_length % (2 * cp):
        p.append(f"seq_length({batch.seq_length}) % (2 * cp({cp})) = {batch.seq_length % (2 * cp)} != 0: "
                 f"context parallel splits each sequence into 2*cp chunks")
    step = batch.micro_batch_size * dp
    if batch.global_batch_size % step:
        p.append(f"global_batch_size({batch.global_batch_size}) % (micro_batch_size({batch.micro_batch_size}) "
                 f"* dp({dp})) = {batch.global_batch_size % step} != 0")
    p.extend(_expert_problems(shape, lay))
    if tp > cluster.gpus_per_node:
        res.warnings.append(f"tp({tp}) > gpus_per_node({cluster.gpus_per_node}): TP traffic crosses nodes (slow)")
    if batch.sequence_parallel and tp == 1:
        res.warnings.append("sequence_parallel has no effect with tp(1)")
    return res


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
