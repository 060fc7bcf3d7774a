"""Output names are built and parsed back in one module."""

from __future__ import annotations

from pathlib import Path

from slap_ray.names import (
    alpha_key,
    alphas_named,
    keep_column,
    kept_list,
    kept_table,
    keys_of,
    selected_rows,
    shown,
    sweep_key,
    weight_column,
)


def test_names_of_plain_and_sweep_selections_round_trip():
    assert keep_column(0.3) == "keep_a0.3" == keep_column(alpha_key(0.3))
    assert weight_column(0.25) == "weight_a0.25"
    key = sweep_key("slap-tau3", 0.4, 2)
    assert key == "slap-tau3__a0.4__s2" and keep_column(key) == "keep_slap-tau3__a0.4__s2"
    columns = ["id", keep_column(0.3), weight_column(0.3), keep_column(key), "loss"]
    assert keys_of(columns) == ["a0.3", key]
    assert [shown(k) for k in keys_of(columns)] == ["0.3", key]


def test_kept_files_and_selected_folders_name_their_alpha():
    run = Path("run")
    assert kept_list(run / "kept", 0.2) == run / "kept" / "alpha-0.2.txt"
    assert selected_rows(run, 0.35) == run / "selected" / "alpha-0.35"
    found = [kept_list(run / "kept", 0.4), kept_table(run / "kept", 0.4), selected_rows(run, 0.2)]
    assert alphas_named(found) == ["0.2", "0.4"]
