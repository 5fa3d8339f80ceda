"""hpctrain: fine-tune and pretrain Hugging Face LLMs with megatron-core on Slurm clusters."""

__version__ = "0.1.0"
