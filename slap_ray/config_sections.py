"""The sections of the one typed config (``slap_ray.config.SlapConfig``): each setting with its
default and its description, which `slap config` prints. Defaults live only here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
)

from slap_ray.names import EMBEDDED_CHITCHAT, EMBEDDED_CHITCHAT_EVAL
from slap_ray.selection_spec import SelectionSpec, option_label, optional_options
from slap_ray.vocabulary import (
    BadRowPolicy,
    ChitchatMode,
    Format,
    GenerationMetric,
    Method,
    OnPolicyMode,
    Schema,
    Truncation,
)

# Marks a field (or a whole section) that changes where or how a job runs, never which rows
# are prepared, scored and selected: ``--resume`` reuses finished work across a change of it
# (``selection_inputs``, the resume fingerprint). Every other field is in the fingerprint.
RUN_ONLY: dict[str, Any] = {"run_only": True}


def _run_only(*default: Any, **kwargs: Any) -> Any:
    return Field(*default, json_schema_extra=RUN_ONLY, **kwargs)


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


class DataConfig(_Section):
    """Where rows come from and how they are normalised and tokenised."""

    paths: list[str] = Field(default_factory=lambda: [EMBEDDED_CHITCHAT], min_length=1)
    """Input files or globs (JSONL, JSON, Parquet, CSV, gzip, `datasets` folders), or
    `embedded:chitchat` for the bundled sample."""
    format: Format = "auto"
    """File format; `auto` decides by extension (a folder saved with `datasets` is `hf_disk`)."""
    schema_: Schema = Field("auto", alias="schema")
    """Row layout: `messages` (chat turns), `alpaca`, `sharegpt`, `prompt_response`, or `auto` to
    detect it per row."""
    prompt_field: str = "prompt"
    """Column holding the prompt in `prompt_response` rows."""
    response_field: str = "response"
    """Column holding the response in `prompt_response` rows."""
    system_field: str | None = None
    """Column holding an optional system prompt (None: no system turn)."""
    id_field: str = "id"
    """Column with each row's stable id; rows without one get an id derived from their source and
    content."""
    source: str | None = None
    """Source label for rows that carry no `source` field (None: the file's name, e.g. `gsm8k`
    for gsm8k.jsonl)."""
    task: str | None = None
    """Task label for rows that carry no `task` field (None: a default task)."""
    on_bad_rows: BadRowPolicy = "error"
    """`error` stops at the first malformed row with its file and line; `skip` drops it and
    counts it in rejected/."""
    max_rows: int | None = Field(None, ge=1)
    """Keep a seeded sample of at most this many rows of the pool (None: every row)."""
    max_length: int = Field(512, ge=8)
    """Tokens per row after the chat template; longer rows are truncated (see `truncation`)."""
    truncation: Truncation = "keep_response"
    """How long rows are cut: `keep_response` drops the oldest tokens first (the response
    survives), `right` cuts the end."""
    chitchat_mode: ChitchatMode = "pairs"
    """For `embedded:chitchat`: one row per adjacent turn pair (`pairs`) or whole conversations
    (`multiturn`)."""
    num_tokenizers: int | None = _run_only(None, ge=1)
    """Tokenise tasks (one CPU each) running at once; None: one per CPU of the cluster, so
    tokenising grows with the nodes."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


class ModelConfig(_Section):
    """The causal LM that scores (and later trains): offline alias, local dir or Hub id."""

    name: str = "smollm2-135m-instruct"
    """The causal LM that scores and trains: an offline alias (`smollm2-135m-instruct`, `tiny-
    bpe`, ...), a local folder, or a Hub id already in the local cache."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype when loading the model."""


class EmbedConfig(_Section):
    """Sentence embeddings for the distribution strata."""

    model: str = "all-minilm-l6-v2"
    """Sentence-embedding model for the distribution strata: an offline alias or a local folder."""
    batch_size: int = _run_only(128, ge=1)
    """Texts per embedding call."""
    num_actors: int = _run_only(1, ge=1)
    """Embedding actors (model replicas) running at once."""
    num_cpus_per_actor: float = _run_only(1.0, gt=0)
    """CPUs each embedding actor holds (ignored with a GPU); it runs that many torch threads."""
    num_gpus_per_actor: float = _run_only(0.0, ge=0)
    """GPUs (or a fraction) each embedding actor holds; 0 runs on CPU."""
    max_chars: int = Field(2000, ge=16)
    """Characters of each conversation that are embedded (its turns as `role: content`)."""


class StrataConfig(_Section):
    """Distribution strata (SLAP_METHOD.md section 3, step 1): k-means on sentence embeddings
    (``by: embedding``), or one stratum per value of a column the rows already carry."""

    by: Literal["embedding", "source", "task"] = "embedding"
    """Distribution strata: k-means clusters of the embeddings (`embedding`), or one stratum per
    `source` or `task` value."""
    num_clusters: int = Field(8, ge=1)
    """k of k-means (with `by: embedding`)."""
    fit_sample_size: int = Field(4096, ge=1)
    """Rows sampled to fit k-means; every row is then assigned to its nearest centroid."""
    max_iter: int = Field(50, ge=1)
    """k-means iterations at most."""


class SelectConfig(SelectionSpec):
    """Per-batch selection (section 1) and the budget grid: the selection spec (method and
    options, ``slap_ray.selection_spec``) plus how the batches are scored.

    ``mode``: ``offline`` scores the pool once (``slap select``) and fine-tunes on the kept ids;
    ``online`` selects every training batch inside the training loop (the paper's setting).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=False, validate_assignment=True, use_attribute_docstrings=True
    )

    mode: Literal["offline", "online"] = _run_only("offline")
    """`offline` scores the pool once (`slap select`) and fine-tunes on the kept ids; `online`
    selects every training batch inside the training loop."""
    alphas: list[float] = _run_only(default_factory=lambda: [0.2, 0.3, 0.4])
    """Fractions of each batch that are PRUNED (0.3 keeps 70%); one kept list per alpha."""
    batch_size: int = Field(32, ge=1)
    """Rows per composed batch that selection sees (the B of SLAP_METHOD.md)."""
    eps: float = Field(1e-6, gt=0)
    """Added to the square root of the second moment when preconditioning gradient features."""
    calibration_batches: int = Field(4, ge=0)
    """Batches back-propagated before scoring to estimate the Adam second moment of the LM head
    (0: uniform)."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Decay of the second-moment EMA (as Adam's beta2)."""
    onpolicy: OnPolicyMode = _run_only("kept_graphs")
    """On-policy only: keep every row's graph and back-propagate the kept ones (`kept_graphs`),
    or score without grad and then forward and back-propagate only the kept rows
    (`recompute`)."""

    def spec(self) -> SelectionSpec:
        """The selection spec alone (what the scorers and the training loop carry)."""
        return SelectionSpec.model_validate(
            self.model_dump(include=set(SelectionSpec.model_fields))
        )

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
    """The causal LM that scores and selects offline (None: `model.name`); a small proxy may
    select for a larger trained model."""

    num_scorers: int = _run_only(1, ge=1)
    """Scorer actors (model replicas) running at once."""
    num_cpus_per_scorer: float = _run_only(1.0, gt=0)
    """CPUs each scorer holds (ignored with a GPU); it runs that many torch threads."""
    num_gpus_per_scorer: float = _run_only(0.0, ge=0)
    """GPUs (or a fraction) each scorer holds; 0 runs on CPU."""
    micro_batch_size: int = _run_only(8, ge=1)
    """Rows per no-grad scoring forward (offline scorers, on-policy `recompute`)."""
    vocab_chunk: int | None = _run_only(None, ge=1)
    """Vocabulary rows per chunk when computing LM-head features (None: sized to bound memory)."""


class TrainConfig(_Section):
    """Fine-tuning with Ray Train (``slap finetune``, ``slap run``).

    ``batch_size`` is the global batch per optimizer step (the B that on-policy selection sees),
    split over workers and then into micro-batches whose gradients accumulate. ``alpha``: the
    pruning ratio trained on (offline: which ``kept/alpha-*.txt`` of the selection; 0 = all
    scored rows; online: pruned per batch).
    """

    alpha: float = Field(0.3, ge=0, lt=1)
    """Pruning ratio trained on: offline, which `kept/alpha-*.txt` of the selection (0 = every
    scored row); online, pruned per batch."""
    selection_dir: str | None = None
    """The `slap select` run whose kept ids offline fine-tuning reads (None:
    `<output_dir>/select` in `slap run`)."""
    finetuning: Literal["lora", "full"] = "lora"
    """`lora` trains adapters on a frozen base; `full` trains every weight."""
    lora_rank: int = Field(8, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names that get LoRA adapters."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    """Fraction of the steps with linear warm-up before the cosine decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient-norm clip (None: no clipping)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training rows."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (None: `epochs` decide)."""
    batch_size: int = Field(16, ge=1)
    """Global batch per optimizer step (the B on-policy selection sees), split over workers, then
    into micro-batches."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Rows per forward within a worker (None: 1 on-policy with kept graphs, else 4)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`fp32`, or `bf16` autocast."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: bool = False
    """One GPU per training worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources each training worker holds."""
    torch_threads: int = Field(1, ge=1)
    """torch threads per training worker."""
    seed: int | None = None
    """Seed of batch order, adapter initialisation and on-policy selection (None: `seed`); a
    sweep sets it per trial while the data sample stays that of `seed`."""
    checkpoint_every: int = Field(10, ge=1)
    """Steps between Ray Train checkpoints (a killed run resumes from the last one)."""
    num_checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints kept in storage."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts Ray Train may make after a failure (-1: unlimited)."""

    def resolved_micro_batch_size(self, mode: str, onpolicy: str = "kept_graphs") -> int:
        """On-policy selection with kept graphs saves backward work only per whole micro-batch:
        default 1 there; 4 otherwise (recompute back-propagates only kept rows anyway)."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        return 1 if mode == "online" and onpolicy == "kept_graphs" else 4


class EvalConfig(_Section):
    """Held-out evaluation: response-token loss / perplexity, and an optional generation check."""

    paths: list[str] = Field(default_factory=lambda: [EMBEDDED_CHITCHAT_EVAL], min_length=1)
    """Held-out files or globs (same formats as `data.paths`), or `embedded:chitchat-eval`."""
    max_rows: int | None = Field(256, ge=1)
    """Held-out rows evaluated at most (None: all)."""
    max_rows_per_source: int | None = Field(None, ge=1)
    """Held-out rows per source at most, a seeded sample of each (None: no per-source cap), so
    that every source's loss rests on enough rows; `max_rows` then caps the total."""
    micro_batch_size: int = Field(8, ge=1)
    """Rows per evaluation forward."""
    generate_rows: int = Field(0, ge=0)
    """Held-out rows answered by greedy generation (0: no generation check): the first rows of
    the eval set, scored with ROUGE-L; with `generate_metrics`, that many rows of each listed
    source (by id), scored with the source's metric."""
    generate_metrics: dict[str, GenerationMetric] = Field(default_factory=dict)
    """Source -> metric of the generation check: `exact_match` (SQuAD-normalised; short answers
    such as nq_open), `chrf` (sacrebleu, 0-100; translation such as ntrex) or `rouge_l`."""

    @field_validator("generate_metrics")
    @classmethod
    def _metrics_need_rows(cls, metrics: dict, info: ValidationInfo) -> dict:
        if metrics and not info.data.get("generate_rows"):
            raise ValueError("needs eval.generate_rows > 0 (the rows answered per source)")
        return metrics

    max_new_tokens: int = Field(64, ge=1)
    """New tokens per generated answer at most."""
    model_dir: str | None = None
    """`slap evaluate` only: the saved model to score, a fine-tuning run's `model/` folder
    (a LoRA adapter over `model.name`, or full weights). Rows listed in the run's
    `train_ids.txt` beside it are never evaluated."""


Mode = Literal["offline", "online"]


class _Arm(_Section):
    """One arm of a sweep: a selection method with its options (ablations are arms too).

    Options left unset take the ``select`` section's values; ``alphas``/``modes`` unset take
    the sweep's. The options are those of the selection spec, added below (``ArmConfig``).
    """

    method: Method
    """The arm's selection method (as `select.method`)."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The arm's label in results (None: the method plus its set options)."""
    alphas: list[float] | None = None
    """This arm's alphas (None: `sweep.alphas`)."""
    modes: list[Mode] | None = None
    """This arm's modes (None: `sweep.modes`)."""

    def options(self) -> dict:
        """The selection options this arm sets (the others follow ``select``)."""
        names = [n for n in SelectionSpec.model_fields if n != "method"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def spec(self, base: SelectionSpec) -> SelectionSpec:
        """This arm's selection spec: its method and options over ``base`` (``select``'s)."""
        return base.with_options(method=self.method, **self.options())

    def label(self) -> str:
        """The arm's name in results: ``name``, else the method plus the options it sets."""
        if self.name:
            return self.name
        parts = [option_label(n, v) for n, v in self.options().items()]
        return "-".join([self.method, *(p for p in parts if p)])


ArmConfig = create_model("ArmConfig", __base__=_Arm, **optional_options())


class SweepConfig(_Section):
    """`slap sweep`: a grid of (arm, mode, alpha, seed) trials plus the full-data reference."""

    arms: list[ArmConfig] = Field(
        default_factory=lambda: [ArmConfig(method="slap"), ArmConfig(method="random")],
        min_length=1,
    )
    """Selection arms, each a method with options (ablations are arms too); see `sweep.arms[].*`."""
    alphas: list[float] = Field(default_factory=lambda: [0.2, 0.3, 0.4], min_length=1)
    """Pruned fractions the grid trains at (0 < alpha < 1)."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Seeds: each gives one data sample, selection and training run per arm and alpha."""
    modes: list[Mode] = Field(default_factory=lambda: ["offline"], min_length=1)
    """`offline` (select, then train on the kept ids) and/or `online` (select inside training)."""
    full_data: bool = True
    """Also train on every row (the reference) once per seed."""
    max_concurrent_trials: int = Field(1, ge=1)
    """Ray Tune trials running at once."""
    trial_cpus: float = Field(0.0, ge=0)
    """CPUs the trial driver itself holds while its TorchTrainer's workers train (it only waits)."""
    bootstrap_samples: int = Field(10_000, ge=100)
    """Bootstrap resamples for the results' intervals."""

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
    """Ray cluster to join (None: RAY_ADDRESS, else start a local instance)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local instance (None: the machine's)."""
    object_store_memory: int | None = Field(None, ge=78_643_200)
    """Object-store bytes of a local instance (None: Ray's default)."""
    check_resources: bool = True
    """Fail at once when the job's actors can never fit the cluster (off for autoscaling clusters
    whose nodes appear on demand)."""
    rows_per_block: int | None = Field(None, ge=1)
    """Execution layout only (never the result): rows per block after reading (None: one block
    per file)."""
    shuffle_partitions: int | None = Field(None, ge=1)
    """Execution layout only: partitions per shuffle (None: the cluster's CPUs, or one per 50,000
    rows where that is more)."""
    storage_path: str | None = None
    """Ray Train checkpoints and Tune state: None keeps them in the run directory; a shared
    folder or URI (s3://, gs://) puts them there, under a name derived from output_dir so a
    restarted job resumes."""
