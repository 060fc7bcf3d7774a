"""The names a user can write in a config, defined once: selection methods, loss-strata kinds,
preconditioners, on-policy modes, input formats, row schemas, generation metrics, truncation
modes, bad-row policies and chitchat modes. The config's types, the readers, the selection and
evaluation code all take them from here (a plain module, so loading a config imports nothing
heavy). The config validates a user's value against them once; the library functions that take
one check it again only as the guard of their own API, against the same tuple."""

from __future__ import annotations

from typing import Literal

METHODS = ("slap", "random", "full", "online_hard", "ccs", "infobatch")
STRATA_KINDS = ("width", "quantile")
FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "hf_disk")
SCHEMAS = ("auto", "messages", "alpaca", "sharegpt", "prompt_response")
PRECONDITIONERS = ("adam", "factored", "none")
ONPOLICY_MODES = ("kept_graphs", "recompute")
GENERATION_METRICS = ("exact_match", "chrf", "rouge_l")
TRUNCATIONS = ("keep_response", "right")
BAD_ROW_POLICIES = ("error", "skip")
CHITCHAT_MODES = ("pairs", "multiturn")

Method = Literal[METHODS]
StrataKind = Literal[STRATA_KINDS]
Format = Literal[FORMATS]
Schema = Literal[SCHEMAS]
Preconditioner = Literal[PRECONDITIONERS]
OnPolicyMode = Literal[ONPOLICY_MODES]
GenerationMetric = Literal[GENERATION_METRICS]
Truncation = Literal[TRUNCATIONS]
BadRowPolicy = Literal[BAD_ROW_POLICIES]
ChitchatMode = Literal[CHITCHAT_MODES]
