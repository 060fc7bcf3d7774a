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
