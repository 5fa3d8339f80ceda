"""Compatibility layer: megatron-core 0.16.1 to 0.19 on CPU (gloo) and on GPUs without TE/apex.

megatron-core assumes CUDA in a handful of places. Everything this project does to get past
those assumptions lives here, applied once per process by ``apply(device_type)`` before any
model, optimizer or checkpoint code runs. Each patch says what breaks and why the patch is safe.

Device-independent patches (applied for "cuda" too):

* ``WrappedTorchNorm`` (the norm of the local spec when TE/apex are absent) asserts that
  sequence parallelism is off. With SP the norm sees a sequence shard, which is fine for a
  per-token norm; its weight/bias gradients are then partial sums per TP rank, so we tag them
  ``sequence_parallel = True`` and megatron-core's ``finalize_model_grads`` all-reduces tagged
  grads over the TP group (the same treatment TE's norms get).
* ``CheckpointWithoutOutput.__init__`` sets ``self.fp8 = fp8 is not None``, which is True for
  the default ``fp8=False``; selective recompute of ``layernorm`` then calls TE's
  ``activation_recompute_forward`` and raises ``NameError`` without TE. We set the flag to
  "fp8 requested and TE present".
* MoE router (``moe_utils.RouterGatingLinearFunction``) tests ``te_general_gemm is not None``, a
  name that module only defines when TE imports: without TE that is a ``NameError``. We define it
  as None, which selects megatron-core's own torch matmul path.

CPU-only patches (``device_type == "cpu"``):

* ``torch.cuda.current_device()`` raises without CUDA; megatron-core passes its result as a
  ``device=`` argument (RoPE, p2p, DDP buffers, checkpoint saver). It returns the CPU device.
* ``torch.cuda.synchronize()`` (schedules, checkpoint saver) becomes a no-op: CPU ops are synchronous.
* The MoE alltoall token dispatcher copies its split sizes to the host on a side CUDA stream
  (``torch.cuda.Stream()``, ``torch.cuda.stream(s)``, ``record_event().synchronize()``): on the
  CPU the tensors are on the host already, so the stream is a stand-in whose waits and events
  are no-ops and ``torch.cuda.stream`` is a null context. Its ``maybe_move_tensor_to_cpu(...,
  as_numpy=True)`` only converts CUDA tensors, so on the CPU the split sizes stayed tensors, which
  gloo's ``all_to_all_single`` rejects: CPU tensors are converted to numpy there too (what a CUDA
  run hands over). With expert tensor parallel (ETP > 1) next to EP the dispatcher gathers and
  reduce-scatters UNEVEN token counts over the ETP group (``all_gather`` / ``reduce_scatter`` with
  per-rank tensor lists); gloo only does even all-gathers and no list reduce-scatter, so on the CPU
  those two go through an even all-gather of padded rows / an all-reduce of the whole tensor (same
  numbers: sums in the same order, padding dropped).
* megatron-core >= 0.17 only: the DDP grad-bucket sync asks for ``torch.cuda.current_stream()`` on
  every step (to wait for CUDA-graph replays); on the CPU it gets a stream whose waits are no-ops
  (CPU ops are synchronous, and there are no CUDA graphs to wait for).
* The CUDA RNG tracker (``model_parallel_cuda_manual_seed``, the dropout ``fork``) reads and
  writes CUDA generator states; the CUDA RNG calls are backed by the CPU default generator, so
  the tracker's fork/restore semantics hold (one generator plays the device generator's role).
* Hard-coded ``device="cuda"`` in megatron-core's tensor factories (pipeline token counting,
  clip_grads, optimizer scalars, grad scaler, checkpoint exchange, the local attention's causal
  mask) is redirected to the CPU, and so are ``.cuda()``, ``.to("cuda")`` and ``pin_memory``.
  The factories are redirected ONLY for megatron-core: every ``megatron.core.*`` module's global
  ``torch`` is swapped for a proxy module whose factories turn a CUDA ``device=`` into the CPU
  (modules imported later get it from an import hook). ``torch.empty`` & co. themselves stay
  untouched, because torch keys on their identity: ``with torch.device("meta")`` /
  ``set_default_device`` (``torch.utils._device._device_constructors``), dynamo and inductor.
  (Replacing them process-wide, as an earlier version did, silently disabled meta-device
  construction, and transformers' ``from_pretrained`` then left RoPE's ``inv_freq`` as garbage.)
  Not a ``TorchFunctionMode`` either: a mode is popped while its own handler runs, so
  everything inside ``Tensor.backward`` - recompute, TP backward collectives - would escape it.
  The ``Tensor`` method patches stay process-wide; they only change requests for a CUDA device,
  which cannot succeed on a machine without one anyway.
* ``tensor.type() == 'torch.cuda.FloatTensor'`` checks in the optimizers and clip_grads:
  ``Tensor.type()`` reports CPU tensors under the CUDA type names (``tensor.type()`` with no argument only).

Versions: every patch below was checked against 0.16.1 and 0.19.2 (the code it replaces is the
same in both; the one signature that changed, the thd RoPE's, is handled where it is used:
model/portable/rope.py). ``apply`` is idempotent and refuses a megatron-core outside
mcore_version.SUPPORTED (set ``HPCTRAIN_COMPAT_ANY_MCORE=1`` to try anyway, with a warning).
"""
from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
import types
import warnings

import torch

log = logging.getLogger(__name__)

_applied: set[str] = set()


def apply(device_type: str) -> None:
    """Patch megatron-core for ``device_type`` ("cpu" or "cuda"). Safe to call repeatedly."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"compat.apply: device_type must be 'cpu' or 'cuda', got {device_type!r}")
    _check_mcore_version()
    if "common" not in _applied:
        _patch_torch_norm_sequence_parallel()
        _patch_checkpoint_without_output_fp8()
        _patch_moe_router_without_te()
        _applied.add("common")
    if device_type == "cpu" and "cpu" not in _applied:
        _patch_cuda_runtime_calls()
        _patch_rng_tracker()
        _patch_device_placement()
        _patch_moe_host_copies()
        _patch_uneven_collectives()
        _applied.add("cpu")


def applied() -> frozenset[str]:
    """Which patch groups are active in this process ("common", "cpu")."""
    return frozenset(_applied)


def _check_mcore_version() -> None:
    from megatron.core import package_info

    from hpctrain.train.mcore_version import OVERRIDE_ENV, unsupported

    msg = unsupported(package_info.__version__)
    if msg is None:
        return
    if os.environ.get(OVERRIDE_ENV) == "1":
        warnings.warn(msg + f"; its patches may not match (continuing: {OVERRIDE_ENV}=1)")
        return
    raise RuntimeError(msg + f", or set {OVERRIDE_ENV}=1 to try anyway.")


# ----------------------------------------------------------------------------- device-independent
def _patch_torch_norm_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        sp = config.sequence_parallel
        config.sequence_parallel = False  # only to get past the assert; restored below
        try:
            norm = original_new(cls, config, hidden_size, eps, persist_layer_norm,
                                zero_centered_gamma, normalization)
        finally:
            config.sequence_parallel = sp
        if sp:
            for p in norm.parameters():
                # finalize_model_grads all-reduces grads of tagged params over TP.
                setattr(p, "sequence_parallel", True)
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _patch_checkpoint_without_output_fp8() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = bool(fp8) and mrandom.HAVE_TE

    mrandom.CheckpointWithoutOutput.__init__ = __init__


def _patch_moe_router_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------- CPU only
class _CpuEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _CpuStream:
    """A CUDA stream stand-in on the CPU (``current_stream()``, ``Stream()``): every wait is
    already satisfied, events are complete when recorded."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        pass


def _patch_moe_host_copies() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_uneven_collectives() -> None:
    import torch.distributed as tdist
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        rows = max(output_split_sizes)
        padded = input_.new_zeros((rows,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((rows * group.size(),) + tuple(input_.shape[1:]))
        tdist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * rows: r * rows + n] for r, n in enumerate(output_split_sizes)])

    def scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        tdist.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start: start + input_split_sizes[group.rank()]].clone()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = scatter_uneven


def _patch_cuda_runtime_calls() -> None:
    import contextlib

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.current_stream = lambda device=None: _CpuStream()


def mcore_version() -> tuple[int, ...]:
    """megatron-core's (major, minor, patch), for patches that only some versions need."""
    from megatron.core import package_info

    return tuple(int(x) for x in package_info.__version__.split(".")[:3] if x.isdigit())


def _patch_rng_tracker() -> None:
    """Back the 'CUDA' generator megatron-core uses with the CPU default generator."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which stays a lazy no-op here.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # bare index = CUDA device


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
              "randint", "randperm", "linspace", "empty_like", "zeros_like", "ones_like", "full_like",
              "rand_like", "randn_like", "empty_strided", "eye")


def _redirect_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _wrap_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        return fn(*args, **_redirect_kwargs(kwargs))
    factory._hpctrain_original = fn
    return factory


class _CpuTorch(types.ModuleType):
    """``torch`` as megatron-core's modules see it on the CPU: the factories in _FACTORIES turn a
    CUDA ``device=`` (and ``pin_memory=True``) into the CPU; every other name is torch's own, looked
    up at each access (so later patches of torch.cuda & co. are seen)."""

    def __init__(self):
        super().__init__("torch", "torch, with megatron-core's CUDA factory requests sent to the CPU")
        for name in _FACTORIES:
            setattr(self, name, _wrap_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH: _CpuTorch | None = None
_SCOPE_PREFIX = "megatron.core"


def _in_scope(name: str) -> bool:
    return name == _SCOPE_PREFIX or name.startswith(_SCOPE_PREFIX + ".")


def _scope_module(module) -> None:
    if getattr(module, "__dict__", {}).get("torch") is torch:
        module.torch = _CPU_TORCH


class _ScopeLoader(importlib.abc.Loader):
    """Runs the real loader, then gives the new megatron-core module the CPU torch proxy."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _scope_module(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class _ScopeFinder(importlib.abc.MetaPathFinder):
    """Import hook: megatron-core modules imported after ``apply("cpu")`` get the proxy too."""

    def find_spec(self, fullname, path, target=None):
        if not _in_scope(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ScopeLoader(spec.loader)
                return spec
        return None


def _patch_device_placement() -> None:
    """megatron-core's factories via the module proxy; Tensor methods process-wide (see the module doc)."""
    global _CPU_TORCH
    _CPU_TORCH = _CpuTorch()
    for name, module in list(sys.modules.items()):
        if _in_scope(name) and module is not None:
            _scope_module(module)
    sys.meta_path.insert(0, _ScopeFinder())
    T = torch.Tensor
    orig_to, orig_type = T.to, T.type
    orig_new = {n: getattr(T, n) for n in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")}

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        return orig_to(self, *args, **_redirect_kwargs(kwargs))

    def type_(self, *args, **kwargs):
        name = orig_type(self, *args, **kwargs)
        return _CUDA_TYPE_NAMES.get(name, name) if not args and not kwargs else name

    T.cuda = lambda self, *a, **k: self
    T.pin_memory = lambda self, *a, **k: self
    T.to = functools.wraps(orig_to)(to)
    T.type = functools.wraps(orig_type)(type_)
    for n, f in orig_new.items():
        setattr(T, n, (lambda f: functools.wraps(f)(
            lambda self, *a, **k: f(self, *a, **_redirect_kwargs(k))))(f))


def megatron_torch():
    """The ``torch`` megatron-core's modules see (the CPU proxy after ``apply("cpu")``, else torch)."""
    return _CPU_TORCH if _CPU_TORCH is not None else torch
