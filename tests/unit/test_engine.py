"""DeepSpeed options, the learning-rate schedule and the rendezvous store, built from the spec (no engine
started)."""

import errno
import socket

import pytest

from tests.unit.tiny_models import tiny_lm
from troupe.actors.learner.config import LearnerConfig, RankSetup
from troupe.actors.learner.engine import ds_config, lr_factor, open_store


def spec(**kw):
    return LearnerConfig(**kw)


def test_ds_config_exposes_zero_offload_and_precision():
    cfg = ds_config(spec(zero_stage=3, offload_optimizer=True, offload_params=True), "bfloat16", on_gpu=False)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["zero_force_ds_cpu_optimizer"]
    # an inf/NaN gradient skips the step whatever DeepSpeed's default
    assert cfg["bf16"]["check_grad_overflow"]
    plain = ds_config(spec(zero_stage=1, grad_clip=0.5), "float32", on_gpu=False)
    assert "offload_optimizer" not in plain["zero_optimization"] and not plain["bf16"]["enabled"]
    assert plain["gradient_clipping"] == 0.5
    assert plain["managed_gradient_accumulation"] is False
    with pytest.raises(ValueError, match="stage 3"):
        ds_config(spec(zero_stage=2, offload_params=True), "float32", on_gpu=False)


def test_lr_schedules():
    warm = spec(lr_schedule="constant", warmup_steps=3)
    assert [lr_factor(s, warm, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = spec(lr_schedule="linear", min_lr_ratio=0.0)
    assert (
        lr_factor(0, lin, 10) == 1.0
        and lr_factor(5, lin, 10) == pytest.approx(0.5)
        and lr_factor(10, lin, 10) == 0.0
    )
    cos = spec(lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(5, cos, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, cos, 10) == pytest.approx(0.1) and lr_factor(50, cos, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, spec(lr_schedule="step"), 10)


def test_dropout_is_switched_off_in_the_loaded_config(tmp_path):
    from transformers import GPT2Config

    from troupe.actors.learner.engine import config_without_dropout

    GPT2Config(
        n_layer=1, n_embd=8, n_head=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    ).save_pretrained(tmp_path)
    cfg = config_without_dropout(str(tmp_path))
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert cfg.n_embd == 8  # the rest untouched


def test_rendezvous_port_is_held_from_the_moment_it_is_chosen():
    """CI once lost a race: rank 0 probed a free port, released it, and another process bound it before the
    process group's store did (EADDRINUSE). The store now binds first and reports the port it holds."""
    setup = RankSetup(model_path="unused", train=LearnerConfig(world_size=2), collective_timeout_s=5)
    store = open_store("127.0.0.1", setup)
    assert store.port > 0
    with socket.socket() as other, pytest.raises(OSError) as taken:
        other.bind(("", store.port))
    assert taken.value.errno == errno.EADDRINUSE
    store.set("key", "value")  # a usable store, not just a bound socket
    assert store.get("key") == b"value"


def test_fp32_buffers_recomputes_what_zero_init_made_in_bf16():
    """zero.Init casts the rotary frequencies to bf16 as they are made; fp32_buffers brings back the values an
    unpartitioned model computes in fp32, inside a wrapper too, and never touches a weight."""
    import torch
    from torch import nn

    from troupe.actors.learner.engine import fp32_buffers

    exact = tiny_lm()
    rotary = exact.model.rotary_emb
    wrapper = nn.ModuleDict({"lm": tiny_lm(seed=1)})
    wrapper["lm"].load_state_dict(exact.state_dict())
    wrapper["lm"].bfloat16()  # what zero.Init leaves: weights and buffers in the training dtype
    weights = {n: p.clone() for n, p in wrapper.named_parameters()}
    shadow = wrapper["lm"].model.rotary_emb
    assert not torch.equal(shadow.inv_freq.float(), rotary.inv_freq), "bf16 rounding must show to be undone"

    assert fp32_buffers(wrapper) == 2  # inv_freq and original_inv_freq
    assert shadow.inv_freq.dtype == shadow.original_inv_freq.dtype == torch.float32
    assert torch.equal(shadow.inv_freq, rotary.inv_freq) and torch.equal(
        shadow.original_inv_freq, rotary.inv_freq
    )
    assert all(torch.equal(p, weights[n]) for n, p in wrapper.named_parameters())
    assert fp32_buffers(wrapper) == 0  # nothing left to change
