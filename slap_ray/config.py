"""The one typed config of a slap-ray run: YAML file + dotted overrides, validated.

Defaults live only here. Unknown keys are errors that name the key; ranges are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slap_ray.vocabulary import (
    Format,
    Method,
    OnPolicyMode,
    Preconditioner,
    Schema,
    StrataKind,
)

# How an arm's label names a non-default preconditioner ("raw": plain gradient norms).
ARM_PRECONDITIONER_LABELS = {"factored": "factored", "none": "raw"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where rows come from and how they are normalised and tokenised."""

    paths: list[str] = Field(default_factory=lambda: ["embedded:chitchat"], min_length=1)
    format: Format = "auto"
    schema_: Schema = Field("auto", alias="schema")
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str | None = None
    id_field: str = "id"
    source: str | None = None
    task: str | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    max_rows: int | None = Field(None, ge=1)
    max_length: int = Field(512, ge=8)
    truncation: Literal["keep_response", "right"] = "keep_response"
    chitchat_mode: Literal["pairs", "multiturn"] = "pairs"
    # Tokenise tasks (one CPU each) running at once. None: one per CPU of the cluster, so
    # tokenising grows with the nodes.
    num_tokenizers: int | None = Field(None, ge=1)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(_Section):
    """The causal LM that scores (and later trains): offline alias, local dir or Hub id."""

    name: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"


class EmbedConfig(_Section):
    """Sentence embeddings for the distribution strata."""

    model: str = "all-minilm-l6-v2"
    batch_size: int = Field(128, ge=1)
    num_actors: int = Field(1, ge=1)
    # CPUs each actor holds (ignored with a GPU); it runs that many torch threads.
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    max_chars: int = Field(2000, ge=16)


class StrataConfig(_Section):
    """Distribution strata (SLAP_METHOD.md section 3, step 1): k-means on sentence embeddings
    (``by: embedding``), or one stratum per value of a column the rows already carry."""

    by: Literal["embedding", "source", "task"] = "embedding"
    num_clusters: int = Field(8, ge=1)
    fit_sample_size: int = Field(4096, ge=1)
    max_iter: int = Field(50, ge=1)


class SelectConfig(_Section):
    """Per-batch selection (section 1) and the budget grid.

    ``mode``: ``offline`` scores the pool once (``slap select``) and fine-tunes on the kept ids;
    ``online`` selects every training batch inside the training loop (the paper's setting).
    """

    mode: Literal["offline", "online"] = "offline"
    method: Method = "slap"
    alphas: list[float] = Field(default_factory=lambda: [0.2, 0.3, 0.4])
    batch_size: int = Field(32, ge=1)
    num_strata: int = Field(3, ge=1)
    tau: float = Field(1.0, gt=0)
    strata: StrataKind = "width"
    eps: float = Field(1e-6, gt=0)
    projection_dim: int | None = Field(None, ge=1)
    calibration_batches: int = Field(4, ge=0)
    beta2: float = Field(0.999, ge=0, lt=1)
    # How LM-head gradient features are preconditioned: exact elementwise Adam second moment
    # (``adam``), its Adafactor-style rank-1 factorisation (``factored``, O(T^2 (V + H)) per
    # example), or raw gradient norms (``none``, s_hat = 1, the ablation).
    preconditioner: Preconditioner = "adam"
    # On-policy only: keep every row's graph and back-propagate the kept ones (``kept_graphs``),
    # or score the batch without grad in micro-batches of ``score.micro_batch_size`` and then
    # forward + backward only the kept rows in ``train.micro_batch_size`` (``recompute``).
    onpolicy: OnPolicyMode = "kept_graphs"

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, alphas: list[float]) -> list[float]:
        if not alphas:
            raise ValueError("at least one alpha is needed")
        for alpha in alphas:
            if not 0.0 <= alpha < 1.0:
                raise ValueError(f"alpha must satisfy 0 <= alpha < 1, got {alpha}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas must be distinct, got {alphas}")
        return sorted(alphas)


class ScoreConfig(_Section):
    """Scorer actors holding model replicas.

    ``model``: the causal LM that scores and selects offline (None: ``model.name``). A small
    proxy can select for a larger trained model: selection writes ids, fine-tuning joins on them
    and tokenizes with its own model, so the two tokenizers may differ.
    """

    model: str | None = None

    num_scorers: int = Field(1, ge=1)
    # CPUs each scorer holds (ignored with a GPU); it runs that many torch threads.
    num_cpus_per_scorer: float = Field(1.0, gt=0)
    num_gpus_per_scorer: float = Field(0.0, ge=0)
    # Rows per no-grad scoring forward (offline scorers, on-policy ``recompute``).
    micro_batch_size: int = Field(8, ge=1)
    vocab_chunk: int | None = Field(None, ge=1)


class TrainConfig(_Section):
    """Fine-tuning with Ray Train (``slap finetune``, ``slap run``).

    ``batch_size`` is the global batch per optimizer step (the B that on-policy selection sees),
    split over workers and then into micro-batches whose gradients accumulate. ``alpha``: the
    pruning ratio trained on (offline: which ``kept/alpha-*.txt`` of the selection; 0 = all
    scored rows; online: pruned per batch).
    """

    alpha: float = Field(0.3, ge=0, lt=1)
    selection_dir: str | None = None
    finetuning: Literal["lora", "full"] = "lora"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    torch_threads: int = Field(1, ge=1)
    # Seed of batch order, adapter initialisation and on-policy selection (default: ``seed``);
    # a sweep sets it per trial while the data sample stays that of ``seed``.
    seed: int | None = None
    checkpoint_every: int = Field(10, ge=1)
    num_checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    log_every: int = Field(1, ge=1)

    def resolved_micro_batch_size(self, mode: str, onpolicy: str = "kept_graphs") -> int:
        """On-policy selection with kept graphs saves backward work only per whole micro-batch:
        default 1 there; 4 otherwise (recompute back-propagates only kept rows anyway)."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return 1 if mode == "online" and onpolicy == "kept_graphs" else 4


class EvalConfig(_Section):
    """Held-out evaluation: response-token loss / perplexity, optional generation + ROUGE-L."""

    paths: list[str] = Field(default_factory=lambda: ["embedded:chitchat-eval"], min_length=1)
    max_rows: int | None = Field(256, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    generate_rows: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)


Mode = Literal["offline", "online"]


class ArmConfig(_Section):
    """One arm of a sweep: a selection method with its options (ablations are arms too).

    Options left unset take the ``select`` section's values; ``alphas``/``modes`` unset take
    the sweep's.
    """

    method: Method
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    num_strata: int | None = Field(None, ge=1)
    tau: float | None = Field(None, gt=0)
    strata: StrataKind | None = None
    preconditioner: Preconditioner | None = None
    alphas: list[float] | None = None
    modes: list[Mode] | None = None

    def label(self) -> str:
        """The arm's name in results: ``name``, else the method plus its non-default options."""
        if self.name:
            return self.name
        parts = [self.method]
        for key in ("num_strata", "tau", "strata"):
            if getattr(self, key) is not None:
                parts.append(f"{key}{getattr(self, key)}")
        if self.preconditioner is not None and self.preconditioner != "adam":
            parts.append(ARM_PRECONDITIONER_LABELS[self.preconditioner])
        return "-".join(parts)


class SweepConfig(_Section):
    """`slap sweep`: a grid of (arm, mode, alpha, seed) trials plus the full-data reference."""

    arms: list[ArmConfig] = Field(
        default_factory=lambda: [ArmConfig(method="slap"), ArmConfig(method="random")],
        min_length=1,
    )
    alphas: list[float] = Field(default_factory=lambda: [0.2, 0.3, 0.4], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    modes: list[Mode] = Field(default_factory=lambda: ["offline"], min_length=1)
    full_data: bool = True
    max_concurrent_trials: int = Field(1, ge=1)
    # CPUs the trial driver itself holds while its TorchTrainer's workers train: it only waits.
    trial_cpus: float = Field(0.0, ge=0)
    bootstrap_samples: int = Field(10_000, ge=100)

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, alphas: list[float]) -> list[float]:
        if any(not 0.0 < a < 1.0 for a in alphas):
            raise ValueError(f"sweep alphas must satisfy 0 < alpha < 1, got {alphas}")
        return sorted(set(alphas))

    @field_validator("arms")
    @classmethod
    def _arm_names_unique(cls, arms: list[ArmConfig]) -> list[ArmConfig]:
        labels = [a.label() for a in arms]
        if len(set(labels)) != len(labels) or "full" in labels:
            raise ValueError(f"arm names must be unique and not 'full', got {labels}")
        return arms


class RayConfig(_Section):
    """How to reach (or start) Ray."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    object_store_memory: int | None = Field(None, ge=78_643_200)
    # Fail at once when the job's actors can never fit the cluster (off for autoscaling clusters
    # whose nodes appear on demand).
    check_resources: bool = True
    # Execution layout only (never the result): rows per block after reading (None: one block
    # per file) and partitions per shuffle (None: the cluster's CPUs, or one per 50,000 rows
    # where that is more).
    rows_per_block: int | None = Field(None, ge=1)
    shuffle_partitions: int | None = Field(None, ge=1)
    # Ray Train checkpoints and Ray Tune state: None keeps them in the run directory; a folder
    # every node mounts or a URI (s3://..., gs://...) puts them there, under a name derived from
    # output_dir so a restarted job resumes (multi-node Train needs storage all nodes reach).
    storage_path: str | None = None


class SlapConfig(_Section):
    """A whole run."""

    seed: int = 0
    output_dir: str = "runs/default"
    resume: bool = False
    progress: bool = True
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    strata: StrataConfig = Field(default_factory=StrataConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def scoring_model(self) -> str:
        """The model that tokenizes, scores and selects in `slap select`."""
        return self.score.model or self.model.name


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` overrides (values parsed as YAML) in a nested dict, in place."""
    for text in overrides:
        path, value = _parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]).replace("schema_", "schema")
        reason = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{key}: {reason}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(tree: dict | None = None, overrides: list[str] | None = None) -> SlapConfig:
    """Validate a nested dict (plus overrides) into a ``SlapConfig``."""
    tree = apply_overrides(dict(tree or {}), list(overrides or []))
    try:
        return SlapConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> SlapConfig:
    """Load YAML config files (the defaults when none) and apply overrides.

    Several files layer: a later file's keys replace an earlier one's, section by section
    (lists are replaced whole), e.g. a run config, then a hardware config for the cluster.
    """
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    tree: dict = {}
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _layer(tree, loaded or {})
    return build_config(tree, overrides)


def _layer(tree: dict, layer: dict) -> dict:
    """Merge ``layer`` into ``tree`` in place: mappings merge, anything else is replaced."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _layer(tree[key], value)
        else:
            tree[key] = value
    return tree


def config_to_dict(config: SlapConfig) -> dict:
    """The resolved config as plain data (YAML/JSON ready), with public key names."""
    return config.model_dump(mode="json", by_alias=True)


def write_resolved_config(config: SlapConfig, path: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    return path
