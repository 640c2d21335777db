"""Frozen start-up configuration. Built once from the CLI/YAML; never mutated afterwards.

Values that depend on the model (max_model_len when unset, the number of KV blocks) are
resolved at load time into separate objects rather than written back here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.spec_decode.config import SpeculativeConfig

ATTENTION_BACKENDS = ("auto", "torch", "cpu_paged", "cuda_paged", "flash_attn")
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")
# Weight quantization (engine/layers/quant/resolve.py): "auto" serves the checkpoint as stored
# (compressed-tensors, GPTQ or AWQ when its config.json says so, GGUF for a .gguf file);
# int8 / int4 quantize a bf16 or float32 checkpoint at load time.
QUANTIZATIONS = ("auto", "int8", "int4", "compressed-tensors", "gptq", "awq", "gguf")


@dataclass(frozen=True)
class ModelConfig:
    # A local Hugging Face directory or a hub id (downloaded into the HF cache once, at
    # start-up: engine/models/hub.py; the processes after that see the snapshot directory).
    model: str
    tokenizer: str | None = None
    # Hub ids only: the branch, tag or commit to download (None: the default branch), of
    # the model and of the tokenizer (None: the model snapshot's tokenizer, or the default
    # branch of a separate tokenizer hub id).
    revision: str | None = None
    tokenizer_revision: str | None = None
    # Hub ids only: the Hugging Face cache directory to use (None: HF_HUB_CACHE).
    download_dir: str | None = None
    # "auto" | "float32" | "bfloat16" ("auto" = bfloat16 on CPU, the checkpoint dtype on CUDA).
    dtype: str = "auto"
    # None: the model's own context length.
    max_model_len: int | None = None
    served_model_names: tuple[str, ...] = ()
    chat_template: str | None = None
    # "auto" (detect from the template) | "string" | "openai": the shape of message content.
    chat_template_content_format: str = "auto"
    seed: int = 0
    # "auto" (cuda when a CUDA device is visible, else cpu) | "cpu" | "cuda" | "cuda:N".
    device: str = "auto"
    # "auto": the checkpoint's safetensors, else its PyTorch .bin/.pt files | "safetensors" |
    # "pt" | "dummy": random weights from config.json alone (benchmarks of a model's shape
    # without its checkpoint, as the reference server offers).
    load_format: str = "auto"
    # Most top logprobs a request may ask for (logprobs / prompt_logprobs).
    max_logprobs: int = 20
    # "auto" (from the architecture: encoders embed, decoders generate) | "generate" | "embed".
    task: str = "auto"
    # Embeddings: "auto" (sentence-transformers config, else cls/last) | "mean" | "cls" | "last".
    pooling_type: str = "auto"
    # "auto" (cpu_paged on CPU when our kernels build; flash_attn, else cuda_paged on CUDA;
    # torch otherwise) | "torch" | "cpu_paged" | "cuda_paged" | "flash_attn".
    attention_backend: str = "auto"
    # One of QUANTIZATIONS (`--quantization`).
    quantization: str = "auto"

    def __post_init__(self) -> None:
        if self.task not in ("auto", "generate", "embed"):
            raise ValueError(f"task must be auto, generate or embed, got {self.task!r}")
        if self.pooling_type not in ("auto", "mean", "cls", "last"):
            raise ValueError(f"pooling_type must be auto, mean, cls or last, got {self.pooling_type!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                             f"got {self.load_format!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("dtype float16 is not supported on CPU (use bfloat16 or float32)")
        if self.chat_template_content_format not in ("auto", "string", "openai"):
            raise ValueError("chat_template_content_format must be auto, string or openai")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization (--quantization) must be one of "
                             f"{', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )


# What --kv-cache-dtype accepts (fp8 would be CUDA's; it is not built yet).
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Bytes of KV cache; None = a default sized for the device (see runner/kv_memory.py).
    kv_cache_memory: int | None = None
    # Test knob: exact number of KV blocks (overrides kv_cache_memory).
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    # CUDA only, when kv_cache_memory is unset: the share of the device's total memory this
    # process may hold (weights + activations + KV cache), as in the reference server.
    gpu_memory_utilization: float = 0.9
    # "auto": the model's dtype; "int8": per token-and-head quantized rows
    # (engine/attention/kv_quant.py).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    # Token budget of one step (prefill chunks + decode tokens).
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"  # "fcfs" | "priority"

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be fcfs or priority, got {self.policy!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class LoRAModule:
    """One adapter served from start-up (`--lora-modules`)."""

    name: str
    path: str
    # The served model it adapts (its `parent` in /v1/models); None: the first served name.
    base_model_name: str | None = None


@dataclass(frozen=True)
class LoRAConfig:
    """`--enable-lora` and its limits (engine/lora/)."""

    # Distinct adapters one step may run (resident in the model's stacked slots).
    max_loras: int = 1
    max_lora_rank: int = 16
    # Loaded adapters kept in host memory (LRU); None: max_loras.
    max_cpu_loras: int | None = None
    modules: tuple[LoRAModule, ...] = ()
    # `--allow-runtime-lora-updating` (or VLLM_ALLOW_RUNTIME_LORA_UPDATING): adapters may be
    # loaded and unloaded while serving.
    allow_runtime_updating: bool = False

    @property
    def cpu_loras(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras (--max-loras) and max_lora_rank (--max-lora-rank) must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras (--max-cpu-loras) must be >= max_loras (--max-loras)")


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is split across processes (engine/distributed/)."""

    # Ranks that each hold a slice of every layer (`--tensor-parallel-size`).
    tensor_parallel_size: int = 1
    # Stages of consecutive layers (`--pipeline-parallel-size`), each of
    # tensor_parallel_size ranks; hidden states pass from stage to stage.
    pipeline_parallel_size: int = 1
    # `--enable-expert-parallel`: MoE layers place whole experts on the tensor-parallel ranks
    # (contiguous ranges) instead of slicing every expert's intermediate dim.
    enable_expert_parallel: bool = False
    # Micro-batches a step's requests split into so the stages overlap (None: one per
    # stage; 1: each step passes whole from stage to stage).
    pipeline_micro_batches: int | None = None
    # A micro-batch's fewest tokens: a step with fewer per micro-batch runs whole (a
    # projection over a few rows costs about what it costs over dozens).
    pipeline_micro_batch_min_tokens: int = 64
    # A collective that waits longer than this fails instead of hanging the server.
    distributed_timeout_s: float = 60.0
    # Multi-node: the ranks are spread evenly over `nnodes` machines; this one is `node_rank`.
    nnodes: int = 1
    node_rank: int = 0
    # The rendezvous of rank 0 (None: MASTER_ADDR / MASTER_PORT, else loopback and a free port).
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size (--tensor-parallel-size) must be >= 1, "
                             f"got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size (--pipeline-parallel-size) must be >= 1, "
                             f"got {self.pipeline_parallel_size}")
        if self.enable_expert_parallel and self.tensor_parallel_size < 2:
            raise ValueError("enable_expert_parallel (--enable-expert-parallel) places experts "
                             "on the tensor-parallel ranks: it needs --tensor-parallel-size > 1")
        if self.pipeline_micro_batches is not None and self.pipeline_micro_batches < 1:
            raise ValueError("pipeline_micro_batches (--pipeline-micro-batches) must be >= 1, "
                             f"got {self.pipeline_micro_batches}")
        if self.pipeline_micro_batch_min_tokens < 1:
            raise ValueError("pipeline_micro_batch_min_tokens (--pipeline-micro-batch-min-tokens)"
                             f" must be >= 1, got {self.pipeline_micro_batch_min_tokens}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank (--node-rank) must be in [0, --nnodes={self.nnodes}), "
                             f"got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ValueError(f"--tensor-parallel-size x --pipeline-parallel-size "
                             f"({self.world_size}) must be a multiple of --nnodes {self.nnodes}")
        if self.distributed_timeout_s <= 0:
            raise ValueError("distributed_timeout_s (--distributed-timeout-seconds) must be > 0")


ENGINE_CORE_MODES = ("process", "thread")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # A second model served side by side for embeddings (`--embedding-model`).
    embedding_model: ModelConfig | None = None
    # Guided decoding backend for requests that name none (`--guided-decoding-backend`,
    # resolved to an installed backend), and the options that name carried.
    guided_decoding_backend: str = "llguidance"
    guided_decoding_options: frozenset[str] = frozenset()
    # (SamplingParams field, value) defaults for requests that leave the field unset: the
    # model's generation_config.json and --override-generation-config (--generation-config).
    generation_defaults: tuple[tuple[str, float | int], ...] = ()
    # Where a served engine's step loop runs (`--engine-core`): "process", its own process
    # (the serving threads never take the GIL from it), or "thread", in the serving process.
    engine_core: str = "process"
    # Multi-LoRA serving; None: off (`--enable-lora` not given).
    lora: LoRAConfig | None = None
    # Speculative decoding (`--speculative-config`); None: off.
    speculative: SpeculativeConfig | None = None
    # Tensor parallelism and multi-node (`--tensor-parallel-size`, `--nnodes`, ...).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.engine_core not in ENGINE_CORE_MODES:
            raise ValueError(f"engine core must be one of {ENGINE_CORE_MODES}, got {self.engine_core!r}")
        if self.parallel.world_size > 1:
            self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        """Features whose weights or state the ranks would have to split too, refused at
        start-up rather than served wrongly."""
        refused = {
            "--speculative-config": self.speculative is not None,
            "--embedding-model": self.embedding_model is not None,
            "--task embed": self.model.task == "embed",
            f"--quantization {self.model.quantization}": self.model.quantization != "auto",
        }
        if self.lora is not None and self.parallel.pipeline_parallel_size > 1:
            # Tensor-parallel ranks hold adapter shares; stages would each need their layers'.
            raise ValueError("--enable-lora is not supported with --pipeline-parallel-size > 1 "
                             "(--tensor-parallel-size serves adapters)")
        for flag, given in refused.items():
            if given:
                raise ValueError(f"{flag} is not supported with --tensor-parallel-size > 1 "
                                 "or --pipeline-parallel-size > 1")

