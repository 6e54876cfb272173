"""DeepSpeed options and the learning-rate schedule, built from the spec (no engine started)."""

import pytest
import torch

from actors.learner.engine import LearnerSpec, ds_config, lr_factor
from actors.learner.rank import DeepSpeedRank


def spec(**kw):
    return LearnerSpec(model_path="unused", **kw)


def test_ds_config_exposes_zero_offload_and_precision():
    cfg = ds_config(spec(zero_stage=3, offload_optimizer=True, offload_params=True), "bfloat16", on_gpu=False)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["zero_force_ds_cpu_optimizer"]
    plain = ds_config(spec(zero_stage=1, grad_clip=0.5), "float32", on_gpu=False)
    assert "offload_optimizer" not in plain["zero_optimization"] and not plain["bf16"]["enabled"]
    assert plain["gradient_clipping"] == 0.5
    assert plain["managed_gradient_accumulation"] is False
    with pytest.raises(ValueError, match="stage 3"):
        ds_config(spec(zero_stage=2, offload_params=True), "float32", on_gpu=False)


def test_lr_schedules():
    warm = spec(lr_schedule="constant", warmup_steps=3, total_steps=10)
    assert [lr_factor(s, warm) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = spec(lr_schedule="linear", total_steps=10, min_lr_ratio=0.0)
    assert lr_factor(0, lin) == 1.0 and lr_factor(5, lin) == pytest.approx(0.5) and lr_factor(10, lin) == 0.0
    cos = spec(lr_schedule="cosine", total_steps=10, min_lr_ratio=0.1)
    assert lr_factor(5, cos) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, cos) == pytest.approx(0.1) and lr_factor(50, cos) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, spec(lr_schedule="step"))


def test_micro_batches_cover_every_row_once_per_epoch_and_scale_losses():
    rank = DeepSpeedRank(spec(micro_batch_size=2, mini_batches=2, epochs=2), 0)
    out = list(rank.micro_batches(7))  # 4 micro-batches (2,2,2,1) split into 2 optimizer steps
    assert len(out) == 8
    first_epoch = out[:4]
    rows = torch.cat([r for r, _, _ in first_epoch])
    assert sorted(rows.tolist()) == list(range(7))
    assert [b for _, b, _ in first_epoch] == [False, True, False, True]
    assert [s for _, _, s in first_epoch] == [0.5, 0.5, 0.5, 0.5]
    one = DeepSpeedRank(spec(micro_batch_size=4, mini_batches=3), 0)
    assert [(len(r), b, s) for r, b, s in one.micro_batches(3)] == [(3, True, 1.0)]  # fewer rows than steps
