"""`hpctrain infer`: interactive, scripted and batch generation with an HF model (command.py).

model.py finds and loads the model (and refuses an mcore checkpoint with the export command),
generate.py holds the sampling settings and generation, batch.py answers dataset files into JSONL.
"""
from hpctrain.infer.command import command_line, run
from hpctrain.infer.generate import Sampling, generate, generate_batch, messages

__all__ = ["Sampling", "command_line", "generate", "generate_batch", "messages", "run"]
