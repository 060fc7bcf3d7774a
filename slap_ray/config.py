"""The one typed config of a slap-ray run: YAML file + dotted overrides, validated.

Defaults live only in its sections (``config_sections``). Unknown keys are errors that name the
key; ranges are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from slap_ray.config_sections import (
    RUN_ONLY,
    DataConfig,
    EmbedConfig,
    EvalConfig,
    ModelConfig,
    RayConfig,
    ScoreConfig,
    SelectConfig,
    StrataConfig,
    SweepConfig,
    TrainConfig,
    _run_only,
    _Section,
)
from slap_ray.errors import ConfigError

__all__ = [
    "ConfigError", "SlapConfig", "apply_overrides", "build_config", "config_to_dict",
    "load_config", "selection_inputs", "write_resolved_config",
    "DataConfig",
    "EmbedConfig",
    "EvalConfig",
    "ModelConfig",
    "RUN_ONLY",
    "RayConfig",
    "ScoreConfig",
    "SelectConfig",
    "StrataConfig",
    "SweepConfig",
    "TrainConfig",
]  # fmt: skip


class SlapConfig(_Section):
    """A whole run."""

    seed: int = 0
    """The run's seed; every stage and shard derives its own from it."""
    output_dir: str = _run_only("runs/default")
    """The run directory: resolved config, manifest, outputs, report and logs."""
    resume: bool = _run_only(False)
    """Reuse finished work in output_dir (same as `--resume`)."""
    progress: bool = _run_only(True)
    """Progress bars on the console."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Input rows."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The causal LM."""
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    """Sentence embeddings."""
    strata: StrataConfig = Field(default_factory=StrataConfig)
    """Distribution strata."""
    select: SelectConfig = Field(default_factory=SelectConfig)
    """Selection."""
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    """Scorer actors."""
    train: TrainConfig = _run_only(default_factory=TrainConfig)
    """Fine-tuning."""
    eval: EvalConfig = _run_only(default_factory=EvalConfig)
    """Held-out evaluation."""
    sweep: SweepConfig = _run_only(default_factory=SweepConfig)
    """Budget sweeps."""
    ray: RayConfig = _run_only(default_factory=RayConfig)
    """Ray."""

    @property
    def scoring_model(self) -> str:
        """The model that tokenizes, scores and selects in `slap select`."""
        return self.score.model or self.model.name


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
        reason = item["msg"]
        if item["type"] == "extra_forbidden":
            reason = "unknown key" + _closest(item["loc"])
        lines.append(f"{key}: {reason}")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _closest(loc: tuple) -> str:
    """ "; did you mean `select.alphas`?" for the known key nearest to an unknown one (difflib),
    or nothing where none is near."""
    import difflib

    from slap_ray.config_help import settings

    known = {key for key, _ in settings(SlapConfig)}
    known |= {key.rsplit(".", 1)[0] for key in known if "." in key}  # sections too
    wanted = ".".join("[]" if isinstance(p, int) else str(p) for p in loc).replace(".[]", "[]")
    match = difflib.get_close_matches(wanted, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean `{match[0]}`?" if match else ""


# Settings that no longer do anything; a resolved config.yaml of an older run still loads
# (the key is dropped). Any other unknown key is an error.
RETIRED = {("train", "log_every")}


def _without_retired(tree: dict) -> dict:
    tree = dict(tree)
    for section, key in RETIRED:
        if isinstance(tree.get(section), dict) and key in tree[section]:
            tree[section] = {k: v for k, v in tree[section].items() if k != key}
    return tree


def build_config(tree: dict | None = None, overrides: list[str] | None = None) -> SlapConfig:
    """Validate a nested dict (plus overrides) into a ``SlapConfig``."""
    tree = _without_retired(apply_overrides(dict(tree or {}), list(overrides or [])))
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
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = getattr(error, "problem", None) or "not valid YAML"
            raise ConfigError(f"{where}: {problem}") from None
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


def selection_inputs(model: BaseModel) -> dict:
    """What decides the prepared, scored and selected rows: the config as plain data without
    the fields marked ``RUN_ONLY`` (so a new field is in it unless marked)."""
    tree = model.model_dump(mode="json", by_alias=True)
    for name, info in type(model).model_fields.items():
        key = info.alias or name
        if (info.json_schema_extra or {}).get("run_only"):
            del tree[key]
        elif isinstance(getattr(model, name), BaseModel):
            tree[key] = selection_inputs(getattr(model, name))
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
