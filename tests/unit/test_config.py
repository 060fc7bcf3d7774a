"""Typed config: YAML, dotted overrides, unknown keys and ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slap_ray.config import ConfigError, build_config, load_config, write_resolved_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nselect:\n  method: ccs\n  alphas: [0.4, 0.2]\n")
    config = load_config(path, ["select.num_strata=5", "data.max_rows=100", "ray.num_cpus=2"])
    assert config.seed == 3 and config.select.method == "ccs"
    assert config.select.alphas == [0.2, 0.4]
    assert config.select.num_strata == 5 and config.data.max_rows == 100
    assert config.select.batch_size == 32  # default


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"select\.alpha: unknown key"):
        build_config({}, ["select.alpha=0.3"])
    with pytest.raises(ConfigError, match=r"bogus: unknown key"):
        build_config({"bogus": 1})


@pytest.mark.parametrize(
    "override, key",
    [
        ("select.alphas=[1.0]", "select.alphas"),
        ("select.alphas=[-0.1]", "select.alphas"),
        ("select.num_strata=0", "select.num_strata"),
        ("select.tau=0", "select.tau"),
        ("select.batch_size=0", "select.batch_size"),
        ("select.method=magic", "select.method"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows"),
        ("score.num_scorers=0", "score.num_scorers"),
    ],
)
def test_range_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({}, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        build_config({}, ["select.alphas"])


def test_resolved_config_round_trips(tmp_path):
    config = build_config({"data": {"schema": "alpaca"}}, ["select.alphas=[0.3]"])
    written = write_resolved_config(config, tmp_path / "config.yaml")
    tree = yaml.safe_load(written.read_text())
    assert tree["data"]["schema"] == "alpaca" and tree["select"]["alphas"] == [0.3]
    assert load_config(written) == config


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_validate(path):
    config = load_config(path)
    # runs/ is git-ignored; the published sweep writes into docs/results/ (its own .gitignore
    # keeps the heavy state out of the repository)
    assert config.output_dir.startswith(("runs/", "docs/results/"))
    if config.select.mode == "offline" and config.train.alpha > 0:
        # `slap run` trains on one of the selection's budgets
        assert config.train.alpha in config.select.alphas


def test_example_configs_exist():
    names = {p.name for p in EXAMPLES}
    assert {
        "default.yaml", "pool_tiny.yaml", "pool_smollm2.yaml", "online_smollm2.yaml",
        "sweep_tiny.yaml", "sweep_smollm2.yaml",
    } <= names  # fmt: skip


def test_train_and_eval_sections():
    config = build_config({}, ["select.mode=online", "train.finetuning=full", "train.alpha=0.4"])
    assert config.train.resolved_micro_batch_size("online") == 1
    assert config.train.resolved_micro_batch_size("offline") == 4
    assert config.train.resolved_micro_batch_size("online", "recompute") == 4
    assert (
        build_config({}, ["train.micro_batch_size=2"]).train.resolved_micro_batch_size("online")
        == 2
    )
    assert config.eval.paths == ["embedded:chitchat-eval"]
    for override, key in [
        ("train.alpha=1.0", "train.alpha"),
        ("train.finetuning=qlora", "train.finetuning"),
        ("train.precision=fp8", "train.precision"),
        ("select.mode=sometimes", "select.mode"),
        ("train.lora_rank=0", "train.lora_rank"),
        ("eval.max_rows=0", "eval.max_rows"),
        ("train.bogus=1", "train.bogus"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config({}, [override])


def test_config_files_layer_section_by_section(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "seed: 3\nscore:\n  num_scorers: 2\n  micro_batch_size: 4\nselect:\n  alphas: [0.2]\n"
    )
    hardware = tmp_path / "hardware.yaml"
    hardware.write_text("score:\n  num_scorers: 6\nselect:\n  alphas: [0.3, 0.4]\n")
    config = load_config([run, hardware], ["seed=5"])
    assert config.score.num_scorers == 6 and config.score.micro_batch_size == 4  # merged
    assert config.select.alphas == [0.3, 0.4]  # lists are replaced, not appended
    assert config.seed == 5  # overrides come last
    assert load_config([hardware, run]).score.num_scorers == 2  # order decides


def test_cli_takes_repeated_config_files():
    from slap_ray.cli import parse

    args = parse(["--config", "a.yaml", "--config", "b.yaml", "seed=1"], "select")
    assert args.config == ["a.yaml", "b.yaml"] and args.overrides == ["seed=1"]


def test_preconditioner_and_onpolicy_settings():
    config = build_config({}, ["select.preconditioner=factored", "select.onpolicy=recompute"])
    assert config.select.preconditioner == "factored" and config.select.onpolicy == "recompute"
    for override, key in [
        ("select.preconditioner=shampoo", "select.preconditioner"),
        ("select.onpolicy=graphs", "select.onpolicy"),
        ("select.preconditioned=false", "select.preconditioned"),  # the old key is unknown now
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            build_config({}, [override])
    arms = build_config(
        {"sweep": {"arms": [{"method": "slap", "preconditioner": "none"},
                            {"method": "slap", "preconditioner": "factored"},
                            {"method": "slap", "preconditioner": "adam"}, {"method": "random"}]}},
        [],
    ).sweep.arms  # fmt: skip
    assert [a.label() for a in arms] == ["slap-raw", "slap-factored", "slap", "random"]


def test_every_setting_has_a_description():
    from slap_ray.config import SlapConfig
    from slap_ray.config_help import settings

    keys = dict(settings(SlapConfig))
    assert {"data.schema", "select.tau", "sweep.arms[].method", "ray.storage_path"} <= set(keys)
    undescribed = [key for key, field in keys.items() if len(field.description or "") < 10]
    assert not undescribed, undescribed


def test_slap_config_prints_every_key_with_its_value_default_and_description(tmp_path, capsys):
    from slap_ray.cli import main
    from slap_ray.config import SlapConfig
    from slap_ray.config_help import settings

    layered = tmp_path / "run.yaml"
    layered.write_text("train:\n  epochs: 3\n")
    assert main(["config", "--config", str(layered), "select.alphas=[0.5]"]) == 0
    out = capsys.readouterr().out
    for key, field in settings(SlapConfig):
        assert f"\n{key}" in f"\n{out}", key
        assert field.description.split()[0] in out, key
    assert "select.alphas: [0.5]  (default [0.2, 0.3, 0.4])" in out
    assert "train.epochs: 3  (default 1)" in out
    assert "\nselect.batch_size: 32\n" in out  # a default value shows once
    assert "PRUNED" in out  # alpha is the fraction pruned, said where it is set
    assert main(["config", "select.alphass=[0.5]"]) == 2
    assert "select.alphass: unknown key" in capsys.readouterr().err


def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    from slap_ray.cli import main

    broken = tmp_path / "run.yaml"
    broken.write_text("select:\n  alphas: [0.3\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3:1: "):
        load_config(broken)
    assert main(["config", "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"slap config: {broken}:3:1: "), err


def test_resume_fingerprint_follows_the_field_marks():
    """Settings that change which rows are scored or selected change the fingerprint; settings
    marked run-only (where and how a job runs) do not. score.model was left out of the old
    hand-kept list: a resume with another scoring model reused the first one's scores."""
    from slap_ray.jobs.prepare import fingerprint

    base = fingerprint(build_config({}))
    changes_selection = [
        "score.model=tiny-bpe", "seed=1", "select.tau=0.5", "select.projection_dim=8",
        "data.max_length=256", "strata.num_clusters=4", "embed.max_chars=500",
        "select.calibration_batches=0", "model.dtype=bfloat16",
    ]  # fmt: skip
    run_only = [
        "score.num_scorers=2", "score.micro_batch_size=4", "embed.num_actors=2",
        "select.alphas=[0.5]", "select.mode=online", "data.num_tokenizers=2", "ray.num_cpus=2",
        "train.epochs=3", "sweep.seeds=[7]", "output_dir=elsewhere", "resume=true",
    ]  # fmt: skip
    for override in changes_selection:
        assert fingerprint(load_config(None, [override])) != base, override
    for override in run_only:
        assert fingerprint(load_config(None, [override])) == base, override


def test_an_older_runs_retired_setting_loads_and_an_unknown_one_is_refused():
    """``train.log_every`` did nothing and is gone; a resolved config.yaml that has it loads."""
    assert build_config({"train": {"log_every": 5, "epochs": 2}}).train.epochs == 2
    assert "log_every" not in build_config({}).train.model_dump()
    with pytest.raises(ConfigError, match="log_everything"):
        build_config({"train": {"log_everything": 5}})


def test_eval_sample_caps_each_source_then_the_total():
    import pandas as pd

    from slap_ray.core.seeds import id_rank_key
    from slap_ray.jobs.finetune import _eval_sample

    ids = [f"{s}-{i}" for s in ("gsm8k", "dolly", "nq") for i in range(30)]
    meta = pd.DataFrame({"id": ids, "source": [i.split("-")[0] for i in ids]})
    plain = build_config({"eval": {"max_rows": 50}})
    expected = sorted(ids, key=lambda i: (id_rank_key(0, "eval-rows", i), i))[:50]
    assert _eval_sample(plain, meta) == set(expected)  # the seeded order, as before
    capped = build_config({"eval": {"max_rows": None, "max_rows_per_source": 12}})
    chosen = _eval_sample(capped, meta)
    assert {s: sum(i.startswith(s) for i in chosen) for s in ("gsm8k", "dolly", "nq")} == {
        "gsm8k": 12, "dolly": 12, "nq": 12,
    }  # fmt: skip
    ranked = sorted(
        (i for i in ids if i.startswith("dolly")), key=lambda i: (id_rank_key(0, "eval-rows", i), i)
    )
    assert {i for i in chosen if i.startswith("dolly")} == set(ranked[:12])


def test_an_unknown_key_names_the_closest_known_one_on_one_line():
    cases = {
        "select.alpha=0.3": "select.alpha: unknown key; did you mean `select.alphas`?",
        "selct.tau=2": "selct: unknown key; did you mean `select`?",
        "train.learnig_rate=0.1": "train.learnig_rate: unknown key; did you mean "
        "`train.learning_rate`?",
        "sweep.arms=[{method: slap, tua: 2}]": "sweep.arms.0.tua: unknown key; did you mean "
        "`sweep.arms[].tau`?",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as raised:
            load_config(None, [override])
        assert str(raised.value) == f"invalid config: {message}"
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["banana=1"])
    assert str(raised.value) == "invalid config: banana: unknown key"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("*.yaml"))
)
def test_every_shipped_config_loads(path):
    """The configs a user starts from (README, studies) are valid: no unknown or bad settings."""
    config = load_config([str(path)])
    assert config.output_dir
