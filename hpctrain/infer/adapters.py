"""`hpctrain infer --adapters DIR`: answer with a PEFT LoRA adapter on the HF model.

The adapter (hpctrain's export / save_safetensors output, or peft's save_pretrained) is folded into
the weights once: ``W += scaling * B @ A`` per adapted linear (fp32, then the model's dtype), and the
trained biases and modules_to_save replace the base ones. Generation then runs at the base model's
speed, and no peft install is needed.
"""
from __future__ import annotations

import torch

from hpctrain.model.lora.peft_map import PREFIX, merge_scaling, read_adapter


def _target(model, key: str) -> tuple[str, str]:
    """(module path in ``model``, what) for a PEFT key; what: lora_A, lora_B or a parameter name."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for which in (".lora_A.weight", ".lora_B.weight"):
        if name.endswith(which):
            return name[: -len(which)], which[1:7]
    return name.replace(".base_layer.", "."), "param"


@torch.no_grad()
def apply_adapter(model, path: str) -> int:
    """Merge the adapter at ``path`` into ``model`` in place; returns the adapted linears."""
    state, cfg = read_adapter(path)
    scaling = merge_scaling(cfg)
    params = dict(model.named_parameters())
    pairs: dict[str, dict] = {}
    for key, t in state.items():
        mod, which = _target(model, key)
        if which == "param":
            if mod not in params:
                raise ValueError(f"--adapters {path}: {key} has no parameter {mod} in the model; was the "
                                 "adapter trained on another model?")
            params[mod].copy_(t.to(params[mod].dtype))
            continue
        pairs.setdefault(mod, {})[which] = t
    for mod, ab in pairs.items():
        w = params.get(f"{mod}.weight")
        if w is None or set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"--adapters {path}: {mod} is not a linear of this model (or lacks lora_A/lora_B)")
        w.copy_((w.float() + scaling * (ab["lora_B"].float() @ ab["lora_A"].float())).to(w.dtype))
    return len(pairs)
