"""Configs refuse bad values with the field in the message."""

import pytest

from mixbits.config import QUANTIZERS, SCHEDULES, IterativeConfig, TrainConfig, check_schedule
from mixbits.quant.spec import KEEP


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="`iterative.layers_per_iteration` 0"):
        IterativeConfig(layers_per_iteration=0)
    with pytest.raises(ValueError, match="`iterative.max_ppl_increase` 0"):
        IterativeConfig(max_ppl_increase=0)
    with pytest.raises(ValueError, match="not 16-bit keep"):
        IterativeConfig(spec=KEEP)


def test_train_config_takes_the_run_quantizers_and_schedules():
    for q in QUANTIZERS:
        assert TrainConfig(init=q).init == q
    with pytest.raises(ValueError, match="init='awq' is not known; use one of rtn, clip, gptq"):
        TrainConfig(init="awq")
    assert all(check_schedule(s) == s for s in SCHEDULES)
    with pytest.raises(ValueError, match="schedule='cubic' is not known"):
        TrainConfig(schedule="cubic")
