"""Typed config sections. Field names are the Megatron-SWIFT / Megatron-LM argument names.

Every field name is unique across all sections, so a flat flag (``--lr 1e-5``) maps to exactly one
field (``train.lr``). Defaults are Megatron-SWIFT's; ``None`` means "derived" (see ``resolve.py``) or, for
model-shape fields, "read from the HF config.json" (``MODEL_FALLBACKS`` holds Megatron-SWIFT's value for
when config.json lacks it). Fields marked ``unsupported`` are features that are not built: setting them at all
is refused with the message given here (or the section's, in refusals.py), and they are left out of dumps.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpctrain.config.fields import opt

DTYPES = ("float16", "bfloat16", "float32")
# megatron-core's recompute_modules, plus hpctrain's "mlp_act" (the dense MLP's SwiGLU output; portable spec)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "mlp_act")

# Refusal messages shared by several keys: what is not built, and what to use instead.
_SEQ_CLS = "sequence classification (task_type seq_cls) is not built: hpctrain trains causal LMs; remove the key"
_STREAMING = ("streaming datasets are not built: datasets are tokenized before training (or while training "
              "with lazy_tokenize = true); remove the key")
_INTERLEAVE = ("interleaving datasets is not built: datasets are concatenated (take N rows of each with "
               "'path#N'); remove the key")
_MULTIMODAL = "multimodal models are not built: hpctrain trains text models; remove the key"
_OFFLOAD = ("optimizer CPU offload is not built (megatron-core's hybrid optimizer needs CUDA and TE/apex): keep "
            "optimizer state on the GPUs and shard it over DP with use_distributed_optimizer = true")
_PRECISION_AWARE = ("Transformer Engine's precision-aware optimizer is not built: main params and Adam state "
                    "are fp32; remove the key")
_FP8 = "FP8 training is not built (it needs Transformer Engine's FP8 layers): train in bf16"
_WANDB = "wandb logging is not built: use TensorBoard (tensorboard_dir) or <save>/logging.jsonl"


@dataclass
class ModelConfig:
    """Which model to start from and its architecture ("model parameters")."""

    model: str | None = opt(None, "HF model dir (or GGUF file) to train/convert; gives config.json + tokenizer")
    model_type: str | None = opt(None, "model family", unsupported="hpctrain takes the model family from "
                                 "config.json's architectures (qwen2, llama); remove model_type")
    load: str | None = opt(None, "mcore checkpoint directory to load")
    finetune: bool = opt(False, "load weights only: reset iteration to 0, skip optimizer/RNG state, do not skip data")
    load_safetensors: bool | None = opt(
        None, "without --load: start from --model's HF weights (true) or from random init (false: "
        "pretraining from scratch); None = true when --model is given")
    torch_dtype: str | None = opt(None, "weight and training dtype; None = config.json's dtype / torch_dtype "
                                  "(bf16/fp16 checkpoints train in bf16/fp16)", choices=DTYPES)
    task_type: str = opt("causal_lm", "training task", choices=("causal_lm", "seq_cls"), unsupported=_SEQ_CLS)
    num_labels: int | None = opt(None, "number of labels for seq_cls", unsupported=_SEQ_CLS)
    problem_type: str | None = opt(None, "seq_cls problem type", unsupported=_SEQ_CLS)
    use_cpu_initialization: bool = opt(False, "initialise weights on the CPU (used by HF <-> mcore conversion)")
    no_initialization: bool = opt(True, "skip the random init of the weights when they come from --load")
    num_layers: int | None = opt(None, "transformer layers; None = config.json")
    hidden_size: int | None = opt(None, "hidden size; None = config.json")
    ffn_hidden_size: int | None = opt(None, "MLP hidden size; None = config.json (Megatron: 4*hidden_size)")
    num_attention_heads: int | None = opt(None, "attention heads; None = config.json")
    group_query_attention: bool | None = opt(None, "GQA; false = one KV head per query head; None = "
                                             "num_query_groups decides")
    num_query_groups: int | None = opt(None, "KV heads for GQA; None = config.json (Megatron: 1)")
    max_position_embeddings: int | None = opt(None, "max positions; None = config.json")
    position_embedding_type: str | None = opt(
        None, "positional embedding; None = rope (relative, mrope refused)",
        choices=("learned_absolute", "rope", "mrope", "relative", "none"))
    rotary_base: float | None = opt(None, "RoPE theta; None = config.json (Megatron: 10000)")
    rotary_percent: float | None = opt(None, "fraction of head dim rotated; None = 1.0")
    normalization: str | None = opt(None, "norm type; None = RMSNorm", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float | None = opt(None, "norm epsilon; None = config.json (Megatron: 1e-5)")
    swiglu: bool | None = opt(None, "SwiGLU MLP; None = True")
    untie_embeddings_and_output_weights: bool | None = opt(None, "separate output layer; None = config.json")
    disable_bias_linear: bool | None = opt(None, "no bias in linear layers; None = True")
    add_qkv_bias: bool | None = opt(None, "bias on QKV only; None = family default (Qwen2 True, Llama False)")
    attention_dropout: float | None = opt(None, "attention dropout; None = 0")
    hidden_dropout: float | None = opt(None, "hidden dropout; None = 0")
    kv_channels: int | None = opt(None, "head dim; None = hidden_size // num_attention_heads")
    qk_layernorm: bool | None = opt(None, "norm on Q and K; None = False")
    transformer_impl: str | None = opt(
        None, "layer implementation; None = transformer_engine if installed, else local",
        choices=("local", "transformer_engine"))
    padded_vocab_size: int | None = opt(None, "vocab size incl. padding; None = config.json vocab_size")
    rope_scaling: dict | None = opt(None, "rope_scaling dict as in HF config.json (JSON string on the CLI)")


# What Megatron-SWIFT uses when neither the user nor config.json sets a model-shape field.
MODEL_FALLBACKS = {
    "position_embedding_type": "rope", "rotary_base": 10000.0, "rotary_percent": 1.0,
    "normalization": "RMSNorm", "norm_epsilon": 1e-5, "swiglu": True, "disable_bias_linear": True,
    "attention_dropout": 0.0, "hidden_dropout": 0.0, "qk_layernorm": False, "num_query_groups": 1,
}


@dataclass
class DataConfig:
    """Datasets, template and sequence handling (ms-swift's data + template arguments)."""

    dataset: list[str] = opt([], "training datasets: 'path_or_id[:subset][#samples]' each")
    val_dataset: list[str] = opt([], "validation datasets, same syntax as dataset")
    split_dataset_ratio: float = opt(0.0, "fraction of dataset split off for validation when val_dataset is empty")
    data_seed: int = opt(42, "seed for dataset sampling/shuffling/splitting")
    dataset_num_proc: int = opt(1, "processes for dataset preprocessing")
    load_from_cache_file: bool = opt(False, "reuse datasets' cache files", unsupported=(
        "hpctrain does not use the datasets cache: to tokenize once and reuse the result, run `hpctrain prep` "
        "and set prep_dir"))
    dataset_shuffle: bool = opt(True, "shuffle the training dataset")
    val_dataset_shuffle: bool = opt(False, "shuffle the validation dataset")
    train_dataloader_shuffle: bool = opt(True, "shuffle sample order in the training dataloader")
    streaming: bool = opt(False, "stream and preprocess on the fly", unsupported=_STREAMING)
    interleave_prob: list[float] | None = opt(None, "interleave datasets with these probabilities",
                                              unsupported=_INTERLEAVE)
    stopping_strategy: str = opt("first_exhausted", "interleave stopping rule",
                                 choices=("first_exhausted", "all_exhausted"), unsupported=_INTERLEAVE)
    shuffle_buffer_size: int = opt(1000, "shuffle buffer for streaming datasets", unsupported=_STREAMING)
    columns: dict | None = opt(None, "rename dataset columns: {'old': 'new'} (JSON string on the CLI)")
    strict: bool = opt(True, "a malformed row is an error (False: skip it with a warning)")
    model_name: list[str] | None = opt(None, "self-cognition {{NAME}}: Chinese and English name")
    model_author: list[str] | None = opt(None, "self-cognition {{AUTHOR}}: Chinese and English author")
    cached_dataset: list[str] = opt([], "pre-tokenised ms-swift cached datasets", unsupported=(
        "ms-swift cached datasets are not read: run `hpctrain prep` once and set prep_dir"))
    template: str | None = opt(None, "chat template name", unsupported=(
        "choosing a template by name is not built: hpctrain renders the tokenizer's own chat template "
        "(tokenizer_config.json / chat_template.jinja); remove template"))
    system: str | None = opt(None, "default system prompt; None = the template's")
    max_length: int | None = opt(None, "max tokens per sample; None = max_position_embeddings")
    truncation_strategy: str = opt("delete", "sample longer than max_length", choices=("delete", "left", "right"))
    loss_scale: str = opt("default", "which tokens get loss (template loss_scale)",
                          choices=("default", "last_round", "all"), unsupported=(
                              "loss_scale is not built: sft trains on every assistant turn (ms-swift's "
                              "'default') and pt on every token; remove loss_scale"))
    use_chat_template: bool | None = opt(None, "apply the chat template", unsupported=(
        "hpctrain sft always renders the tokenizer's chat template and hpctrain pt never does: "
        "pick the command, remove use_chat_template"))
    packing: bool = opt(False, "pack samples into packing_length rows")
    packing_length: int | None = opt(None, "packed row length; None = max_length")
    padding_free: bool = opt(True, "flatten the batch (no padding)", unsupported=(
        "padding-free batches of unpacked samples are not built: set packing = true (packed rows carry no "
        "padding between samples); remove padding_free"))
    mlp_padding_free: bool = opt(False, "padding-free MLP with a custom attention mask", unsupported=(
        "custom attention masks are not built; remove mlp_padding_free"))
    lazy_tokenize: bool = opt(False, "tokenize during training instead of before")
    num_workers: int = opt(4, "dataloader workers")
    seq_length: int | None = opt(None, "Megatron sequence length; None = max_length")
    prep_dir: str | None = opt(None, "directory of pre-tokenised shards from `hpctrain prep`")


@dataclass
class ParallelConfig:
    """Model/data parallel layout and distributed settings."""

    tensor_model_parallel_size: int = opt(1, "TP size")
    pipeline_model_parallel_size: int = opt(1, "PP size")
    context_parallel_size: int = opt(1, "CP size")
    sequence_parallel: bool = opt(False, "sequence parallel (needs TP > 1)")
    use_distributed_optimizer: bool = opt(True, "shard optimizer state over DP ranks")
    virtual_pipeline_model_parallel_size: int | None = opt(None, "interleaved pipeline stages per rank")
    decoder_first_pipeline_num_layers: int | None = opt(None, "layers on the first PP stage; None = even split")
    decoder_last_pipeline_num_layers: int | None = opt(None, "layers on the last PP stage; None = even split")
    distributed_backend: str | None = opt(None, "None = nccl when CUDA is available, else gloo (Megatron: nccl)",
                                          choices=("nccl", "gloo"))
    tp_comm_overlap: bool = opt(False, "overlap TP communication with GEMMs (needs Transformer Engine)")
    overlap_grad_reduce: bool = opt(False, "overlap DP grad reduce with backward")
    overlap_param_gather: bool = opt(False, "overlap distributed-optimizer param all-gather")
    distributed_timeout_minutes: int = opt(60, "timeout of every torch.distributed process group (minutes)")
    ddp_timeout: int | None = opt(None, "the same timeout in seconds (ms-swift's spelling); when set it wins")


@dataclass
class LaunchConfig:
    """Local process launch (torchrun-style). Filled from NPROC_PER_NODE etc. as in Megatron-SWIFT."""

    nproc_per_node: int | None = opt(None, "processes per node (env NPROC_PER_NODE); None = 1 / Slurm's tasks")
    nnodes: int | None = opt(None, "nodes for torchrun (env NNODES)")
    node_rank: int | None = opt(None, "this node's rank for torchrun (env NODE_RANK)")
    master_addr: str | None = opt(None, "rendezvous host (env MASTER_ADDR)")
    master_port: int | None = opt(None, "rendezvous port (env MASTER_PORT)")
    cuda_visible_devices: str | None = opt(None, "GPUs to use, e.g. '0,1' (env CUDA_VISIBLE_DEVICES)")


@dataclass
class TrainConfig:
    """Training loop, schedule, recompute, fusions and learning rate."""

    mode: str = opt("sft", "training mode (set by the subcommand)", choices=("sft", "pt"))
    micro_batch_size: int = opt(1, "samples per device per micro-step")
    global_batch_size: int = opt(16, "samples per optimizer step (micro_batch_size * DP * grad accumulation)")
    train_iters: int | None = opt(None, "optimizer steps; None = from max_epochs and the dataset size")
    max_epochs: int | None = opt(None, "stop after this many epochs")
    recompute_granularity: str | None = opt("selective", "activation recompute", choices=("full", "selective"))
    recompute_method: str | None = opt(None, "full recompute split", choices=("uniform", "block"))
    recompute_num_layers: int | None = opt(None, "layers per recompute unit (full recompute)")
    recompute_modules: list[str] = opt(["core_attn"], "modules recomputed by selective recompute",
                                       choices=RECOMPUTE_MODULES)
    deterministic_mode: bool = opt(False, "deterministic kernels (slower)")
    seed: int = opt(42, "random seed for python, numpy, torch")
    lr: float | None = opt(None, "peak learning rate; None = 1e-5 (full) / 1e-4 (LoRA)")
    lr_decay_style: str = opt("cosine", "LR decay",
                              choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_decay_iters: int | None = opt(None, "LR decay steps; None = train_iters")
    lr_warmup_iters: int = opt(0, "linear warmup steps")
    lr_warmup_fraction: float | None = opt(None, "warmup as a fraction of lr_decay_iters")
    min_lr: float = opt(0.0, "LR floor")
    lr_wsd_decay_iters: int | None = opt(None, "WSD: iterations of the final anneal (needed by lr_decay_style WSD)")
    lr_wsd_decay_style: str = opt("exponential", "WSD: anneal shape",
                                  choices=("exponential", "linear", "cosine", "minus_sqrt"))
    override_opt_param_scheduler: bool = opt(False, "on resume, use this run's LR schedule, not the checkpoint's")
    use_checkpoint_opt_param_scheduler: bool = opt(False, "on resume, keep the checkpoint's LR schedule")
    no_masked_softmax_fusion: bool = opt(False, "disable fused scale+mask+softmax")
    no_bias_dropout_fusion: bool = opt(False, "disable bias+dropout fusion")
    no_bias_swiglu_fusion: bool = opt(False, "disable bias+swiglu fusion")
    no_rope_fusion: bool = opt(False, "disable fused RoPE")
    no_gradient_accumulation_fusion: bool = opt(False, "disable gradient accumulation fusion (needs apex)")
    cross_entropy_loss_fusion: bool = opt(False, "fused vocab-parallel cross entropy")
    cross_entropy_fusion_impl: str = opt("native", "fused cross entropy implementation", choices=("native", "te"))
    calculate_per_token_loss: bool = opt(True, "normalise loss by non-padded tokens of the global batch")
    attention_backend: str = opt("flash", "attention backend", choices=("flash", "fused", "unfused", "local", "auto"))
    dataloader_type: str = opt("cyclic", "Megatron dataloader type", choices=("single", "cyclic", "external"))
    cuda_graph_impl: str = opt("none", "'local': replay each step's forward+backward as one CUDA graph "
                               "(one GPU; see docs/config.md for what it needs)", choices=("none", "local"))
    cuda_graph_scope: str = opt("full_iteration", "what one CUDA graph holds (hpctrain: the step's forward "
                                "+ backward)", choices=("full_iteration",))
    cuda_graph_warmup_steps: int = opt(1, "eager steps before the step is captured as a CUDA graph "
                                       "(Megatron-LM: 3; one already compiles and autotunes all the graph replays)")
    profile: bool = opt(False, "torch profiler over profile_step_start..profile_step_end; writes "
                         "<save run>/profile/ (table + Chrome trace)")
    profile_step_start: int = opt(10, "first profiled iteration")
    profile_step_end: int = opt(12, "last profiled iteration")
    manual_gc: bool = opt(False, "disable automatic GC; collect every manual_gc_interval steps")
    manual_gc_interval: int = opt(0, "steps between manual GC runs (0 = only at checkpoints)")
    extra_megatron_kwargs: dict | None = opt(None, "extra megatron-core TransformerConfig kwargs (JSON on the CLI)")
    enable_dft_loss: bool = opt(False, "Dynamic Fine-Tuning loss", unsupported=(
        "the DFT loss is not built: sft trains with the token cross entropy; remove enable_dft_loss"))
    enable_channel_loss: bool = opt(False, "per-channel loss", unsupported=(
        "per-channel loss is not built: one loss over all tokens; remove enable_channel_loss"))
    vit_gradient_checkpointing: bool = opt(True, "multimodal ViT recompute", unsupported=_MULTIMODAL)
    gradient_checkpointing_kwargs: dict | None = opt(None, "torch.utils.checkpoint kwargs", unsupported=(
        "activation recompute is megatron-core's: use recompute_granularity / recompute_method / "
        "recompute_num_layers"))


@dataclass
class OptimConfig:
    """Optimizer and regularisation."""

    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    weight_decay: float = opt(0.1, "weight decay")
    clip_grad: float = opt(1.0, "global L2 grad-norm clip (0 = off)")
    adam_beta1: float = opt(0.9, "Adam beta1")
    adam_beta2: float = opt(0.95, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    sgd_momentum: float = opt(0.9, "SGD momentum")
    optimizer_cpu_offload: bool = opt(False, "keep optimizer state on the CPU", unsupported=_OFFLOAD)
    optimizer_offload_fraction: float = opt(1.0, "fraction of optimizer state offloaded", unsupported=_OFFLOAD)
    use_precision_aware_optimizer: bool = opt(False, "TE precision-aware optimizer", unsupported=_PRECISION_AWARE)
    main_grads_dtype: str = opt("fp32", "main grads dtype (precision-aware)", choices=("fp32", "bf16"),
                                unsupported=_PRECISION_AWARE)
    main_params_dtype: str = opt("fp32", "main params dtype (precision-aware)", choices=("fp32", "fp16"),
                                 unsupported=_PRECISION_AWARE)
    exp_avg_dtype: str = opt("fp32", "Adam m dtype (precision-aware)", choices=("fp32", "fp16", "bf16", "fp8"),
                             unsupported=_PRECISION_AWARE)
    exp_avg_sq_dtype: str = opt("fp32", "Adam v dtype (precision-aware)", choices=("fp32", "fp16", "bf16", "fp8"),
                                unsupported=_PRECISION_AWARE)


@dataclass
class PrecisionConfig:
    """Mixed precision, fp16 loss scaling and FP8."""

    bf16: bool | None = opt(None, "bf16 training; None = from torch_dtype")
    fp16: bool | None = opt(None, "fp16 training; None = from torch_dtype")
    apply_query_key_layer_scaling: bool | None = opt(None, "scale QK^T by 1/layer (true is refused)")
    attention_softmax_in_fp32: bool = opt(True, "attention mask+softmax in fp32")
    static_loss_scale: float | None = opt(None, "fixed fp16 loss scale (Megatron-LM --loss-scale); None = dynamic")
    initial_loss_scale: float = opt(4294967296.0, "initial dynamic fp16 loss scale (2**32)")
    min_loss_scale: float = opt(1.0, "minimum dynamic fp16 loss scale")
    loss_scale_window: int = opt(1000, "steps without overflow before the loss scale grows")
    hysteresis: int = opt(2, "overflows tolerated before the loss scale shrinks")
    fp8_format: str | None = opt(None, "FP8 format", choices=("e4m3", "hybrid"), unsupported=_FP8)
    fp8_recipe: str = opt("delayed", "FP8 recipe", choices=("tensorwise", "delayed", "mxfp8", "blockwise"),
                          unsupported=_FP8)
    fp8_amax_history_len: int = opt(1024, "FP8 amax history length", unsupported=_FP8)
    fp8_amax_compute_algo: str = opt("max", "FP8 amax algorithm", choices=("most_recent", "max"), unsupported=_FP8)
    fp8_param_gather: bool = opt(False, "keep params in FP8 and gather in FP8", unsupported=_FP8)


@dataclass
class CheckpointConfig:
    """Saving and loading megatron-core checkpoints."""

    save: str | None = opt(None, "checkpoint output dir; None = megatron_output/<model basename>")
    save_interval: int = opt(500, "steps between saves (always saved at the end)")
    no_save_optim: bool = opt(False, "do not save optimizer state")
    no_save_rng: bool = opt(False, "do not save RNG state")
    no_load_optim: bool = opt(False, "do not load optimizer state")
    no_load_rng: bool = opt(False, "do not load RNG state")
    ckpt_format: str = opt("torch_dist", "checkpoint format", choices=("torch", "torch_dist", "zarr"))
    auto_detect_ckpt_format: bool = opt(True, "detect legacy vs distributed format on load")
    exit_on_missing_checkpoint: bool = opt(True, "error if load is set but holds no checkpoint")
    add_version: bool = opt(True, "save into <save>/v<N>-<timestamp>/ so runs never overwrite")
    save_safetensors: bool = opt(False, "each save also writes <run>/checkpoint-<iter>/: the HF model "
                                 "(full training) or the PEFT adapter (LoRA) as safetensors; resume still "
                                 "reads the mcore checkpoint")


@dataclass
class LogConfig:
    """Logging and TensorBoard."""

    log_interval: int = opt(5, "steps between log lines")
    tensorboard_dir: str | None = opt(None, "TensorBoard dir; None = <save>/runs")
    log_params_norm: bool = opt(True, "log the L2 norm of all parameters (console, logging.jsonl, TensorBoard)")
    log_throughput: bool = opt(True, "log tokens/s, TFLOP/s and MFU per GPU (console, logging.jsonl, TensorBoard)")
    tensorboard_log_interval: int = opt(1, "steps between TensorBoard writes")
    tensorboard_queue_size: int = opt(50, "TensorBoard writer queue length")
    log_timers_to_tensorboard: bool = opt(True, "write step/data/save times to TensorBoard (timers/*)")
    no_log_learning_rate_to_tensorboard: bool = opt(False, "do not write the LR to TensorBoard")
    log_validation_ppl_to_tensorboard: bool = opt(True, "write validation perplexity to TensorBoard")
    log_memory_to_tensorboard: bool = opt(True, "write memory use to TensorBoard (GPU memory; peak RSS on CPU)")
    logging_level: str | None = opt(None, "Python logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    wandb_project: str = opt("", "wandb project", unsupported=_WANDB)
    wandb_exp_name: str = opt("", "wandb experiment name", unsupported=_WANDB)
    wandb_save_dir: str = opt("", "wandb local dir", unsupported=_WANDB)


@dataclass
class EvalConfig:
    """Evaluation during training."""

    eval_iters: int = opt(-1, "global batches per evaluation (as Megatron-LM); -1 = the whole validation set")
    eval_interval: int | None = opt(None, "steps between evaluations; None = save_interval")


@dataclass
class ExportConfig:
    """`hpctrain export`: HF <-> mcore conversion."""

    to_mcore: bool = opt(False, "convert the HF model (--model) to an mcore checkpoint")
    to_hf: bool = opt(False, "convert the mcore checkpoint (--mcore_model) to HF safetensors")
    mcore_model: str | None = opt(None, "mcore checkpoint to convert to HF")
    output_dir: str | None = opt(None, "conversion output dir; None = <input>-mcore / <input>-hf")
    test_convert_precision: bool = opt(False, "compare HF and mcore logits after converting")
    merge_lora: bool = opt(False, "to_hf of a LoRA checkpoint: write the merged full model instead of the "
                           "PEFT adapter")
    exist_ok: bool = opt(False, "allow writing into an existing output_dir", unsupported=(
        "hpctrain export replaces an existing output_dir with --overwrite true; remove exist_ok"))


@dataclass
class SlurmConfig:
    """`hpctrain submit` / `plan`: Slurm resources and job behaviour."""

    nodes: int = opt(1, "nodes to allocate")
    gpus_per_node: int = opt(8, "GPUs (= training processes) per node")
    partition: str | None = opt(None, "Slurm partition")
    account: str | None = opt(None, "Slurm account")
    qos: str | None = opt(None, "Slurm QOS")
    time: str | None = opt(None, "time limit, e.g. '04:00:00'; None = partition default")
    constraint: str | None = opt(None, "node feature constraint")
    exclusive: bool = opt(False, "allocate nodes exclusively")
    mem: str | None = opt(None, "memory per node, e.g. '200G'")
    cpus_per_task: int | None = opt(None, "CPUs per task")
    extra_sbatch: list[str] = opt([], "extra '#SBATCH' lines, e.g. '--reservation=x'")
    env: dict[str, str] = opt({}, "environment variables exported in the job")
    setup: list[str] = opt([], "shell commands run before training, e.g. 'module load cuda'")
    launcher: str = opt("srun", "one task per GPU via srun, or one torchrun per node", choices=("srun", "torchrun"))
    signal_before_s: int = opt(120, "seconds before the time limit Slurm sends the save-and-requeue signal")
    max_requeue: int = opt(3, "automatic requeues after preemption/timeout")
    job_name: str = opt("hpctrain", "Slurm job name")
    folder: str = opt("runs/slurm", "directory for job scripts and logs (a fresh subfolder per submission)")


_MOE_UNBUILT = ("not built for the Qwen3-MoE experts hpctrain trains (softmax top-k router, no shared expert, "
                "no token dropping); remove the key")
_MLA = "Multi-Latent Attention (DeepSeek) is not built: hpctrain's MoE family is Qwen3-MoE; remove the key"


@dataclass
class MoeConfig:
    """Mixture of Experts (Qwen3-MoE): read from config.json for a MoE model; parallel and kernel choices.

    ``None`` fields come from the HF config.json (families/qwen3_moe.py); a value you set wins."""

    num_experts: int | None = opt(None, "experts per MoE layer (config.json num_experts / num_local_experts)")
    moe_layer_freq: str | None = opt(None, "which layers are MoE: an int N (layers 0, N, 2N...), a 0/1 list "
                                           "'[0,1,1]' or '([0]*1+[1]*47)'; from mlp_only_layers / "
                                           "decoder_sparse_step")
    moe_ffn_hidden_size: int | None = opt(None, "expert FFN size (config.json moe_intermediate_size)")
    moe_shared_expert_intermediate_size: int | None = opt(None, "shared expert FFN size", unsupported=_MOE_UNBUILT)
    moe_router_topk: int | None = opt(None, "experts per token (config.json num_experts_per_tok)")
    moe_router_pre_softmax: bool | None = opt(None, "softmax over all experts before top-k (= not norm_topk_prob)")
    moe_router_dtype: str = opt("fp32", "dtype of the router's logits and softmax", choices=("none", "fp32", "fp64"))
    moe_router_score_function: str | None = opt(None, "router score", choices=("softmax", "sigmoid"),
                                                unsupported=_MOE_UNBUILT)
    moe_router_bias_update_rate: float = opt(1e-3, "expert bias update rate", unsupported=_MOE_UNBUILT)
    moe_router_enable_expert_bias: bool | None = opt(None, "aux-loss-free expert bias", unsupported=_MOE_UNBUILT)
    moe_router_topk_scaling_factor: float | None = opt(None, "top-k score scaling", unsupported=_MOE_UNBUILT)
    moe_router_load_balancing_type: str = opt("aux_loss", "load balancing: aux_loss (Switch-style, per layer) or "
                                                          "none", choices=("aux_loss", "seq_aux_loss", "sinkhorn",
                                                                           "none"))
    expert_model_parallel_size: int = opt(1, "expert parallel size: experts split over this many ranks (divides "
                                             "num_experts and the data-parallel ranks)")
    expert_tensor_parallel_size: int | None = opt(None, "tensor parallel size inside each expert (None: TP)")
    moe_token_dispatcher_type: str = opt("alltoall", "token dispatcher: alltoall or allgather (both run on NCCL "
                                                     "and gloo)", choices=("allgather", "alltoall", "flex",
                                                                           "alltoall_seq"))
    moe_enable_deepep: bool = opt(False, "DeepEP dispatch", unsupported=(
        "DeepEP dispatch needs the deep_ep package and the flex dispatcher, not set up by hpctrain: use "
        "moe_token_dispatcher_type = alltoall"))
    moe_grouped_gemm: bool = opt(True, "experts as one grouped GEMM (PyTorch grouped_mm) instead of a "
                                       "per-expert loop; same numbers, same checkpoint keys")
    moe_permute_fusion: bool = opt(False, "fused token permutation", unsupported=(
        "fused token permutation needs Transformer Engine: remove the key (tokens are permuted with torch ops)"))
    moe_aux_loss_coeff: float | None = opt(None, "load-balancing loss coefficient (config.json "
                                                 "router_aux_loss_coef; 0 = off)")
    moe_z_loss_coeff: float | None = opt(None, "z-loss coefficient", unsupported=_MOE_UNBUILT)
    moe_expert_capacity_factor: float | None = opt(None, "expert capacity factor", unsupported=_MOE_UNBUILT)
    moe_shared_expert_overlap: bool = opt(False, "overlap shared experts with dispatch", unsupported=_MOE_UNBUILT)
    moe_token_drop_policy: str = opt("probs", "token drop policy", choices=("probs", "position"),
                                     unsupported=_MOE_UNBUILT)
    multi_latent_attention: bool = opt(False, "Multi-Latent Attention", unsupported=_MLA)
    q_lora_rank: int | None = opt(None, "MLA query rank", unsupported=_MLA)
    kv_lora_rank: int | None = opt(None, "MLA key/value rank", unsupported=_MLA)
    qk_head_dim: int | None = opt(None, "MLA QK head dim", unsupported=_MLA)
    qk_pos_emb_head_dim: int | None = opt(None, "MLA QK positional head dim", unsupported=_MLA)


@dataclass
class TunerConfig:
    """Partial training: train_type lora trains LoRA adapters on megatron-core's linears (docs/lora.md)."""

    train_type: str = opt("full", "full-parameter or LoRA training", choices=("full", "lora"))
    freeze_llm: bool = opt(False, "freeze the LLM (multimodal)", unsupported=True)
    freeze_vit: bool = opt(True, "freeze the ViT (multimodal)", unsupported=True)
    freeze_aligner: bool = opt(True, "freeze the aligner (multimodal)", unsupported=True)
    freeze_parameters: list[str] = opt([], "parameter prefixes to freeze", unsupported=True)
    freeze_parameters_regex: str | None = opt(None, "regex of parameters to freeze", unsupported=True)
    freeze_parameters_ratio: float = opt(0.0, "fraction of parameters frozen bottom-up", unsupported=True)
    trainable_parameters: list[str] = opt([], "extra trainable prefixes", unsupported=True)
    trainable_parameters_regex: str | None = opt(None, "regex of extra trainable parameters", unsupported=True)
    adapter_load: str | None = opt(None, "LoRA adapter checkpoint to load", unsupported=(
        "a LoRA run's checkpoints hold base weights and adapters together: resume with --load; to start "
        "from a saved adapter use --adapters PEFT_DIR"))
    adapters: list[str] = opt([], "LoRA adapter to start from / run with: one PEFT folder (adapter_config.json "
                              "+ adapter_model.safetensors, as export --to_hf and save_safetensors write)")
    target_modules: list[str] = opt(["all-linear"], "LoRA targets: all-linear, HF names (q_proj k_proj v_proj "
                                    "o_proj gate_proj up_proj down_proj; fused ones together) or megatron "
                                    "names (linear_qkv linear_proj linear_fc1 linear_fc2)")
    target_regex: str | None = opt(None, "LoRA targets by regex over megatron module names (global layer "
                                   "numbers), e.g. 'decoder\\.layers\\.\\d+\\.mlp\\.linear_fc[12]'; "
                                   "replaces target_modules")
    modules_to_save: list[str] = opt([], "modules trained in full and saved with the adapter: embed_tokens "
                                     "(word_embeddings), lm_head (output_layer)")
    lora_rank: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha (scaling alpha / rank)")
    lora_dropout: float = opt(0.05, "dropout on the adapter input")
    lora_bias: str = opt("none", "'all': every bias of the model trains too (PEFT bias='all')",
                         choices=("none", "all"))
    use_rslora: bool = opt(False, "rank-stabilised LoRA: scaling alpha / sqrt(rank)")


@dataclass
class RlhfConfig:
    """DPO / RLHF keys of Megatron-SWIFT (not supported in this version: hpctrain trains sft and pt)."""

    rlhf_type: str = opt("dpo", "RLHF algorithm", choices=("dpo",), unsupported=True)
    ref_load: str | None = opt(None, "reference model checkpoint; None = load", unsupported=True)
    ref_adapter_load: str | None = opt(None, "reference adapter checkpoint", unsupported=True)
    beta: float = opt(0.1, "DPO beta (deviation from the reference)", unsupported=True)
    rpo_alpha: float | None = opt(None, "weight of the SFT term in RPO", unsupported=True)
    reference_free: bool = opt(False, "ignore the reference model", unsupported=True)
    label_smoothing: float = opt(0.0, "DPO label smoothing", unsupported=True)
    f_divergence_type: str = opt("reverse_kl", "f-divergence for DPO", unsupported=True)
    loss_type: str = opt("sigmoid", "DPO loss type", unsupported=True)


# Section name -> class, in the order they are dumped and documented.
SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "launch": LaunchConfig,
    "train": TrainConfig, "optim": OptimConfig, "precision": PrecisionConfig, "checkpoint": CheckpointConfig,
    "log": LogConfig, "eval": EvalConfig, "export": ExportConfig, "slurm": SlurmConfig, "moe": MoeConfig,
    "tuner": TunerConfig, "rlhf": RlhfConfig,
}
