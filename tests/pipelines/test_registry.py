"""pipelines.registry: the one description of the stages matches the stages themselves."""

import dataclasses
import importlib

import pytest

from pipelines.manifests.manifest import SAMPLE_SCHEMA
from pipelines.registry import MODEL_STAGES, STAGES, UNSCREENED_STAGES, in_stage_order, stage_named
from pipelines.stages.filter import SCORERS


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_each_stage_module_names_itself_as_registered(stage):
    module = importlib.import_module(f"pipelines.stages.{stage.name}")
    assert module.STAGE == stage.name
    if stage.config is not None:
        module_name, _, class_name = stage.config.partition(":")
        assert module_name == module.__name__ and dataclasses.is_dataclass(getattr(module, class_name))


def test_score_columns_are_manifest_columns_and_only_model_stages_score():
    for stage in STAGES:
        assert set(stage.scores) <= set(SAMPLE_SCHEMA.names)
        assert not stage.scores or stage.model_stage
    assert MODEL_STAGES == ("caption", "filter", "rank", "score")
    assert set(UNSCREENED_STAGES) == {"download", "caption", "score", "assemble"}  # score rejects nothing


def test_order_and_lookup():
    assert in_stage_order({"assemble", "custom", "download", "filter"}) == ["download", "filter", "assemble", "custom"]
    assert stage_named("rank").scores == ("clip_score", "clip_rank")
    with pytest.raises(ValueError, match="unknown stage 'crop'"):
        stage_named("crop")


def test_the_filters_outranked_reasons_are_its_scorers():
    assert set(stage_named("filter").outranked_reasons) == {scorer.outranked_reason for scorer in SCORERS.values()}
