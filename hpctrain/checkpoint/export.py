"""``hpctrain export``: HF <-> megatron-core conversion with the seed's (Megatron-SWIFT) flags.

    hpctrain export --model HF_DIR_OR_GGUF --to_mcore true --output_dir D [--torch_dtype bfloat16]
                    [--test_convert_precision true] [--overwrite true]
    hpctrain export --mcore_model D --to_hf true --output_dir H [--torch_dtype bfloat16]
                    [--test_convert_precision true] [--overwrite true]

CPU only; no process group needed (the precision test sets up a one-process gloo group itself).
HF -> mcore writes ``D/release`` + tracker ``release`` (see layout.py).
"""
from __future__ import annotations

import sys

from hpctrain.cli_args import CommandLine, flag
from hpctrain.config.errors import ConfigError
from hpctrain.model.mcore_config import DTYPES


def command_line() -> CommandLine:
    return CommandLine("hpctrain export", __doc__.split("\n\n")[0], mode="export", flags=[
        flag("--model", help="HF model dir, GGUF file, or dir holding one GGUF file", config="model.model"),
        flag("--mcore_model", help="megatron-core checkpoint dir (release or iter_*)", config="export.mcore_model"),
        flag("--to_mcore", kind="bool", default=False, help="convert HF -> mcore", config="export.to_mcore"),
        flag("--to_hf", kind="bool", default=False, help="convert mcore -> HF", config="export.to_hf"),
        flag("--output_dir", help="where the converted checkpoint goes", config="export.output_dir",
             required=True),
        flag("--torch_dtype", choices=tuple(sorted(DTYPES)), config="model.torch_dtype",
             help="weight dtype of the output (default: the input's)"),
        flag("--merge_lora", kind="bool", default=False, config="export.merge_lora",
             help="to_hf of a LoRA checkpoint: the merged full model instead of the PEFT adapter"),
        flag("--test_convert_precision", kind="bool", default=False, config="export.test_convert_precision",
             help="compare HF and mcore logits in fp32 after converting; non-zero exit on failure"),
        # ms-swift spells it --exist_ok (the config key export.exist_ok is refused: see config/refusals.py)
        flag("--overwrite", "--exist_ok", kind="bool", default=False, help="replace an existing output_dir"),
        flag("--max_shard_size_gb", type=float, default=5.0, help="HF shard size (to_hf)"),
        flag("--no_progress", kind="bool", default=False, help="no progress lines"),
    ])


def _precision(reference: str, mcore_dir: str) -> int:
    """``reference``: what transformers loads as the ground truth (HF dir or GGUF file)."""
    from hpctrain.checkpoint.precision import check_precision
    from hpctrain.train import dist

    try:
        rep = check_precision(reference, mcore_dir)
    finally:
        dist.destroy()
    print(rep.line(), flush=True)
    return 0 if rep.ok else 3


def run(argv: list[str]) -> int:
    a = command_line().parse(argv)
    if a.to_mcore == a.to_hf:
        print("hpctrain export: pass exactly one of --to_mcore true / --to_hf true", file=sys.stderr)
        return 2
    try:
        if a.to_mcore:
            if not a.model:
                print("hpctrain export --to_mcore needs --model HF_DIR_OR_GGUF", file=sys.stderr)
                return 2
            return _to_mcore(a)
        if not a.mcore_model:
            print("hpctrain export --to_hf needs --mcore_model DIR", file=sys.stderr)
            return 2
        return _to_hf(a)
    except ConfigError as e:  # a config.json the mapping refuses: a usage error, like a bad flag
        print(f"hpctrain export: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"hpctrain export: {e}", file=sys.stderr)
        return 1


def _to_mcore(a) -> int:
    from hpctrain.checkpoint.convert_hf_to_mcore import hf_to_mcore

    if a.merge_lora:
        raise ConfigError("--merge_lora true is an option of --to_hf (a LoRA checkpoint); drop it")
    ref = hf_to_mcore(a.model, a.output_dir, a.torch_dtype, a.overwrite, not a.no_progress)
    print(f"wrote megatron-core checkpoint {ref.path} (tracker {ref.root}/latest_checkpointed_iteration.txt)")
    if not a.test_convert_precision:
        return 0
    # The reference is the user's input as transformers loads it (a GGUF dequantised in fp32),
    # never our own mcore -> HF export: that would test the converter against itself.
    return _precision(a.model, a.output_dir)


def _to_hf(a) -> int:
    from hpctrain.checkpoint.convert_mcore_to_hf import mcore_to_hf

    from hpctrain.checkpoint import layout
    from hpctrain.checkpoint.lora_export import lora_meta

    lora = lora_meta(layout.require_latest(a.mcore_model)) is not None
    adapter = lora and not a.merge_lora
    if lora and a.test_convert_precision:
        raise ConfigError("--test_convert_precision compares the mcore model without adapters: it is not built "
                          "for LoRA checkpoints (tests/lora compares the exports with PEFT); drop it")
    out = mcore_to_hf(a.mcore_model, a.output_dir, a.torch_dtype, a.overwrite,
                      int(a.max_shard_size_gb * 2**30), not a.no_progress, merge_lora=a.merge_lora)
    print(f"wrote {'PEFT adapter' if adapter else 'HF model'} {out}")
    if a.test_convert_precision:
        return _precision(str(out), a.mcore_model)
    return 0


def main() -> int:
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
