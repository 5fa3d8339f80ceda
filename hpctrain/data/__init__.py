"""hpctrain.data: datasets -> token micro-batches for the trainer.

API for the trainer::

    from hpctrain.data import build_train_valid, MicroBatchLoader, load_tokenizer
    tok = load_tokenizer(cfg.model.model)                       # HF dir or .gguf
    train, valid = build_train_valid(cfg, tok, mode="sft")      # or "pt"; valid may be None
    loader = MicroBatchLoader(train, micro_batch_size, dp_rank, dp_size, seed,
                              consumed_samples=0, pad_to_multiple=1)   # packed follows the dataset
    batch = next(iter(loader))
    # {"input_ids": Long[b,s], "labels": Long[b,s] (shifted, -100 = no loss),
    #  "position_ids": Long[b,s], "cu_seqlens": Int32[n+1] (packed only), "num_loss_tokens": int}

pt mode (pretrain.py): documents + EOS are concatenated and cut into windows of seq_length + 1
tokens across document boundaries (Megatron's GPTDataset index, native); every token is a label;
with data.packing the windows restart position_ids at document starts and carry cu_seqlens.

`consumed_samples` counts global samples (all DP ranks), so a resumed run passes the number the
checkpoint recorded and sees exactly the batches it would have seen. One dataset item is one
sample, or one packed row when data.packing is true (so global_batch_size counts rows then).

Stages, a module each: sources (specs, files, #N sampling) -> mixing (row plan, validation
split) -> formats (alpaca / messages / sharegpt / query-response -> Conversation) ->
self_cognition ({{NAME}}/{{AUTHOR}}) -> template (chat template -> ids + loss mask) -> pipeline
(worker processes -> shards) -> packing (native BFD bins, collation) -> loader. prep writes the
shards once for multi-node runs (`hpctrain prep`).
"""
from .build import build_train_valid
from .errors import DataError, SkipTally
from .loader import MicroBatchLoader
from .options import DataOptions
from .packing import collate_packed, collate_padded
from .prep import open_prepared, prepare
from .pretrain import PtWindowDataset, collate_windows
from .template import Encoder, TemplateError
from .tokenizer import load_tokenizer

__all__ = ["DataError", "DataOptions", "Encoder", "MicroBatchLoader", "PtWindowDataset", "SkipTally",
           "TemplateError", "build_train_valid", "collate_packed", "collate_padded", "collate_windows",
           "load_tokenizer", "open_prepared", "prepare"]
