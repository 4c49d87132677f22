"""The from-scratch curriculum of a BLIP training: ITC alone first, then ITM negatives from easy to hard."""

from pipelines.training.tasks import Schedule
from vlp_core.pretrain import CAPTIONER, FILTER, PRETRAIN


def test_pretraining_trains_itc_alone_during_the_warm_up_then_every_objective():
    schedule = Schedule(steps_per_epoch=10, itc_warmup_steps=3)
    assert [schedule.objectives(step, PRETRAIN) for step in (0, 2, 3, 50)] == [("itc",), ("itc",), PRETRAIN, PRETRAIN]
    assert schedule.objectives(0, FILTER) == ("itc",)


def test_a_training_without_itc_ignores_the_warm_up():
    assert Schedule(steps_per_epoch=10, itc_warmup_steps=3).objectives(0, CAPTIONER) == CAPTIONER


def test_itm_negatives_ramp_from_uniform_to_hard_after_the_warm_up():
    schedule = Schedule(steps_per_epoch=10, itc_warmup_steps=4, easy_negative_steps=8)
    assert [schedule.hardness(step) for step in (0, 4, 8, 12, 40)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert Schedule(steps_per_epoch=10).hardness(0) == 1.0  # no ramp: BLIP's hard negatives throughout
