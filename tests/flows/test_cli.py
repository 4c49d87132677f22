"""The `capfilt` command line: help everywhere, clear errors and exit codes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.ablate import capfilt_ablate
from flows.capfilt import capfilt, inference_pool, run_setup
from flows.cli import add_flow_commands, format_metrics, main
from flows.settings import RUN_PRESETS
from pipelines.cli.main import build_parser
from pipelines.cli.options import config_kwargs
from pipelines.stages.shards import ActorPoolConfig
from pipelines.world.generate import load_world
from vlp_core.checkpoint import CheckpointError

COMMANDS = sorted(build_parser(add_flow_commands)._subparsers._group_actions[0].choices)


def test_every_product_command_is_there() -> None:
    assert {"world", "serve-world", "download", "generations", "run"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_subcommand(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: capfilt {command}" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "capfilt"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["download", "--url-list", str(tmp_path / "none.parquet"), "--root", str(tmp_path)]) == 2
    assert "URL list not found" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "w"), "--n-web", "0"]) == 2
    assert "n_web" in capsys.readouterr().err
    assert main(["world", "--out", str(tmp_path / "w"), "--noise", "clean=abc"]) == 2
    assert "TYPE=RATE" in capsys.readouterr().err
    assert not (tmp_path / "w").exists(), "nothing written for a bad config"


def test_generations_on_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generations", "--root", str(tmp_path)]) == 0
    assert "no generations" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rounds": -1}, "rounds must be an integer ≥ 0"),
        ({"num_captions": 0}, "num_captions must be an integer ≥ 1"),
        ({"top_k": 1.5}, "top_k must be an integer ≥ 1"),
        ({"inference_batch_size": 0}, "inference_batch_size must be an integer ≥ 1"),  # None: the device's default
        ({"itm_threshold": 1.2}, "itm_threshold must be a probability"),
    ],
)
def test_bad_run_settings_fail_before_the_world_is_made(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run_setup({"out_dir": str(tmp_path / "run"), "preset": "smoke", "world_seed": 0, "n_web": None, **overrides})
    assert not (tmp_path / "run").exists()


def test_the_world_sizes_of_a_run_are_the_presets_unless_given(tmp_path: Path) -> None:
    """--n-web and --n-test size the world; the held-out images of a larger set begin with the smaller's."""
    base = {"preset": "smoke", "world_seed": 0, "n_web": None}
    _, small, _ = run_setup({**base, "out_dir": str(tmp_path / "small")})
    _, large, _ = run_setup({**base, "out_dir": str(tmp_path / "large"), "n_web": 70, "n_test": 30})
    small_test, large_test = (json.loads(inputs.test_annotations.read_text()) for inputs in (small, large))
    assert (len(small_test), len(large_test)) == (RUN_PRESETS["smoke"].world.n_test, 30)
    assert large_test[: len(small_test)] == small_test
    assert load_world(tmp_path / "large" / "world")[0].n_web == 70
    with pytest.raises(ValueError, match="n_test must be an integer"):
        run_setup({**base, "out_dir": str(tmp_path / "bad"), "n_test": -1})


def test_run_and_ablate_options_set_the_flow_parameters_of_their_names() -> None:
    parser = build_parser(add_flow_commands)
    args = parser.parse_args(
        ["ablate", "--out", "x", "--threshold", "0.3", "--gpus", "1", "--seeds", "0,1", "--executor", "local"]
    )
    assert config_kwargs(args, capfilt_ablate) == {
        "out_dir": "x",
        "itm_threshold": 0.3,
        "num_gpus": 1.0,
        "seeds": [0, 1],
        "executor": "local",
    }
    args = parser.parse_args(["run", "--preset", "smoke", "--rounds", "2", "--top-k", "3"])
    assert config_kwargs(args, capfilt) == {"preset": "smoke", "rounds": 2, "top_k": 3}
    args = parser.parse_args(["run", "--gpus", "1", "--inference-batch-size", "128"])
    assert config_kwargs(args, capfilt) == {"num_gpus": 1.0, "inference_batch_size": 128}
    on_gpus = ActorPoolConfig(**inference_pool(dataclasses.replace(RUN_PRESETS["tiny"], num_gpus=1)))
    assert (on_gpus.num_gpus, on_gpus.batch_size) == (1, 256), "a GPU run's calls default to 256 images"
    help_text = " ".join(parser._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "--out OUT run folder (default: runs/tiny)" in help_text  # the flow's own default


def test_real_data_needs_a_held_out_set_only_when_something_is_trained(tmp_path: Path) -> None:
    from released_models import released_captioner, released_filter

    parameters = {
        "out_dir": str(tmp_path / "run"),
        "preset": "smoke",
        "world_seed": 0,
        "n_web": None,
        "url_list": "urls.parquet",
        "human_annotations": "human.json",
        "human_image_root": "images",
    }
    with pytest.raises(ValueError, match="also give test_annotations, test_image_root"):
        run_setup(parameters)
    models = {
        "captioner_checkpoint": str(released_captioner(tmp_path / "captioner")),
        "filter_checkpoint": str(released_filter(tmp_path / "filter")),
    }
    settings, inputs, _ = run_setup({**parameters, **models})
    assert (
        settings.trains_nothing and inputs.test_annotations is None and inputs.human_annotations == Path("human.json")
    )

    with pytest.raises(ValueError, match="also give test_annotations, test_image_root"):
        run_setup({**parameters, **models}, evaluates=True)  # the ablation evaluates every arm

    swapped = {"captioner_checkpoint": models["filter_checkpoint"], "filter_checkpoint": models["captioner_checkpoint"]}
    with pytest.raises(CheckpointError, match="filter: its lm_head is initialised at random, and the caption stage"):
        run_setup({**parameters, **swapped, "url_list": None, "out_dir": str(tmp_path / "swapped")})
    assert not (tmp_path / "swapped").exists(), "refused before any work"


def test_the_metrics_table_shows_each_generation_and_its_change() -> None:
    metrics = {
        1: {"retrieval": {"tr@1": 0.2, "ir@1": 0.25}, "captioning": {"bleu_4": 0.1, "cider": 0.5}},
        0: {"retrieval": {"tr@1": 0.3, "ir@1": 0.2}, "captioning": None},
    }
    lines = format_metrics(metrics).splitlines()
    assert lines[0].split() == ["generation", "tr@1", "ir@1", "bleu_4", "cider"]
    assert lines[1].split() == ["0", "0.300", "0.200", "-", "-"]
    assert lines[2].split() == ["1", "0.200", "(-0.100)", "0.250", "(+0.050)", "0.100", "0.500"]
