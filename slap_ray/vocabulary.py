"""The names a user can write in a config, defined once: selection methods, loss-strata kinds,
preconditioners, on-policy modes, input formats, row schemas and generation metrics. The
config's types, the readers, the selection and evaluation code all take them from here (a plain
module, so loading a config imports nothing heavy)."""

from __future__ import annotations

from typing import Literal

METHODS = ("slap", "random", "full", "online_hard", "ccs", "infobatch")
STRATA_KINDS = ("width", "quantile")
FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "hf_disk")
SCHEMAS = ("auto", "messages", "alpaca", "sharegpt", "prompt_response")
PRECONDITIONERS = ("adam", "factored", "none")
ONPOLICY_MODES = ("kept_graphs", "recompute")
GENERATION_METRICS = ("exact_match", "chrf", "rouge_l")

Method = Literal[METHODS]
StrataKind = Literal[STRATA_KINDS]
Format = Literal[FORMATS]
Schema = Literal[SCHEMAS]
Preconditioner = Literal[PRECONDITIONERS]
OnPolicyMode = Literal[ONPOLICY_MODES]
GenerationMetric = Literal[GENERATION_METRICS]
