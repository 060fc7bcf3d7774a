"""A new user's first hour (issue 31): mistakes end in one clear line with exit status 2,
before Ray starts, and help explains (no Ray: every case here stops before a job runs)."""

from __future__ import annotations

import time

import pytest

from slap_ray.cli import finetune_main, select_main


def one_line_error(capsys, main, argv) -> str:
    started = time.monotonic()
    assert main(argv) == 2
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert elapsed < 30  # before Ray starts: no job ran
    return err.strip()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=tiny-randon", "model.name: unknown model 'tiny-randon' (did you mean "
         "`tiny-random`?)"),
        ("model.name=some-org/some-model", "model.name: unknown model 'some-org/some-model'"),
        ("score.model=./no-such-folder", "score.model: folder ./no-such-folder does not exist"),
        ("embed.model=foo/bar", "embed.model: unknown model 'foo/bar'"),
    ],
)  # fmt: skip
def test_a_model_name_that_cannot_load_offline_is_one_line_before_ray(capsys, override, expected):
    message = one_line_error(capsys, select_main, [override])
    assert message.startswith(f"slap select: {expected}")
    if "unknown model" in message:  # the aliases that would load, and how to download
        alias = "all-minilm-l6-v2" if override.startswith("embed") else "tiny-bpe"
        assert alias in message and "HF_HUB_OFFLINE=0" in message


def test_each_command_checks_the_models_it_uses(capsys, tmp_path):
    # finetune trains model.name and never embeds: a wrong embedder is not its concern
    message = one_line_error(capsys, finetune_main, ["model.name=tiny-randon", "embed.model=x/y"])
    assert "model.name" in message and "embed.model" not in message
    (tmp_path / "not-a-model").mkdir()
    message = one_line_error(capsys, select_main, [f"model.name={tmp_path / 'not-a-model'}"])
    assert "holds no model (config.json missing)" in message


def test_evaluate_mistakes_are_one_line_errors_before_ray(capsys, tmp_path):
    from slap_ray.cli import evaluate_main

    out = f"output_dir={tmp_path / 'out'}"
    message = one_line_error(capsys, evaluate_main, [out, "model.name=tiny-bpe"])
    assert (
        message
        == "slap evaluate: eval.model_dir: `slap evaluate` needs the saved model folder to score"
    )
    missing = [out, "model.name=tiny-bpe", f"eval.model_dir={tmp_path / 'nope'}"]
    message = one_line_error(capsys, evaluate_main, missing)
    assert message == f"slap evaluate: eval.model_dir: folder {tmp_path / 'nope'} does not exist"
    (tmp_path / "empty").mkdir()
    message = one_line_error(
        capsys, evaluate_main, [out, "model.name=tiny-bpe", f"eval.model_dir={tmp_path / 'empty'}"]
    )
    assert message.startswith(f"slap evaluate: eval.model_dir: {tmp_path / 'empty'} holds no saved")
    # evaluate loads model.name (the adapter's base) and never selects: the scorer is not checked
    message = one_line_error(
        capsys, evaluate_main, [out, "model.name=tiny-randon", "score.model=x/y"]
    )
    assert "model.name" in message and "score.model" not in message


def selection_with(tmp_path, rows: list[dict]):
    """A finished selection's ``selected/alpha-0.3/`` rows, as `slap select` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "run" / "selected" / "alpha-0.3"
    folder.mkdir(parents=True)
    schema = pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("task", pa.string()),
         ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))]
    )  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-0.parquet")
    return tmp_path / "run"


ROW = {
    "id": "a-1", "source": "a", "task": "t",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
}  # fmt: skip


def test_export_mistakes_are_one_line_errors(capsys, tmp_path):
    from slap_ray.jobs.export import main_export

    run = selection_with(tmp_path, [ROW])
    folder = tmp_path / "existing"
    folder.mkdir()
    message = one_line_error(
        capsys, main_export, [str(run), "--alpha", "0.3", "--output", str(folder)]
    )
    assert message == f"slap export: --output {folder}: is a folder; a jsonl export writes one file"
    (folder / "x").write_text("x")
    argv = [str(run), "--alpha", "0.3", "--format", "hf", "--output", str(folder)]
    assert "exists; an hf export writes a new folder" in one_line_error(capsys, main_export, argv)
    argv = [str(run), "--alpha", "0.5", "--output", str(tmp_path / "o.jsonl")]
    assert "--alpha 0.5:" in one_line_error(capsys, main_export, argv)


def test_an_empty_selection_is_an_error_unless_allowed(capsys, tmp_path):
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    from slap_ray.jobs.export import main_export

    run = selection_with(tmp_path, [])
    for fmt in ("jsonl", "parquet", "hf"):
        target = tmp_path / f"out-{fmt}"
        argv = [str(run), "--alpha", "0.3", "--format", fmt, "--output", str(target)]
        message = one_line_error(capsys, main_export, argv)
        assert "--alpha 0.3: the selection" in message and "kept no rows" in message
        assert not target.exists()
        assert main_export([*argv, "--allow-empty"]) == 0
        assert "0 rows at alpha 0.3" in capsys.readouterr().out
    assert (tmp_path / "out-jsonl").read_text() == ""
    assert pq.read_table(tmp_path / "out-parquet").num_rows == 0
    assert len(load_from_disk(str(tmp_path / "out-hf"))) == 0


def test_a_dataset_dict_folder_is_a_path_error_naming_a_split(tmp_path):
    from datasets import Dataset, DatasetDict

    from slap_ray.config import ConfigError, build_config
    from slap_ray.jobs.rows import input_files

    rows = {"prompt": ["q"], "response": ["a"]}
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    (tmp_path / "plain").mkdir()
    config = build_config({})
    with pytest.raises(ConfigError) as raised:
        input_files(config, [str(tmp_path / "dd")], "data.paths")
    assert str(raised.value) == (
        f"data.paths: {tmp_path / 'dd'} is a DatasetDict with splits ['train', 'test']: give one "
        f"split's folder, e.g. {tmp_path / 'dd' / 'train'}"
    )
    with pytest.raises(ConfigError, match="eval.paths: .*plain is a folder but not a dataset"):
        input_files(config, [str(tmp_path / "plain")], "eval.paths")
    assert input_files(config, [str(tmp_path / "one")], "data.paths") == [str(tmp_path / "one")]


def test_help_lists_the_commands_and_each_says_what_it_reads_and_writes(capsys):
    from slap_ray.cli import COMMANDS, main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n  {command} " in text
    assert "fraction of each batch PRUNED" in text
    for command in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out.replace("\n", " ")
        assert "PRUNED" in text, command
        if command not in ("export", "config"):
            assert "Writes" in text and "slap config" in text, command
    assert main(["selct"]) == 2
    assert "unknown command 'selct'" in capsys.readouterr().err


def test_an_alpha_zero_report_has_no_empty_scoring_cost_sentence():
    from slap_ray.reporting.selection import scoring_cost_lines

    cost = {"scoring_parameters": 10, "trained_parameters": 20, "fraction_per_alpha": {}}
    (line,) = [x for x in scoring_cost_lines("tiny-bpe", cost) if x]
    assert line.endswith("alpha 0 prunes no training to set it against.")
    assert ": ." not in line
    cost["fraction_per_alpha"] = {"0.3": 0.5}
    assert "alpha 0.3: 50.0%" in scoring_cost_lines("tiny-bpe", cost)[1]
