"""Training math: the learning-rate schedule's edges, gradient accumulation with skipped micro-batches,
per-micro-batch mask noise, materialised masks that equal the trained network, towers without a
pruning target, and the affinity loss's logit scales."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyclip_edge.compress.recipe import StageCfg
from tinyclip_edge.compress.trainer import lr_at, warmup_steps

# ------------------------------------------------------------------------------ 1. learning-rate schedule


@pytest.mark.parametrize("steps, warmup", [(4, 0.02), (10, 0.05), (90, 0.05), (84, 0.05), (1, 0.5), (1, 3)])
def test_fractional_or_long_warmup_never_overshoots_the_peak(steps, warmup):
    # 4 x 0.02 = 0.08 warm-up steps: the old schedule took 12.5x the lr at the first step; 10 x 0.05: 2x
    cfg = StageCfg(steps=steps, warmup=warmup, lr=1e-3, min_lr=0.0)
    mults = [lr_at(s, cfg) for s in range(steps)]
    assert max(mults) <= 1.0 and min(mults) >= 0.0, mults


def test_warmup_edges():
    tiny = StageCfg(steps=4, warmup=0.02, lr=1.0)  # less than one step of warm-up: start at the peak
    assert warmup_steps(tiny) == 1 and lr_at(0, tiny) == 1.0
    assert warmup_steps(StageCfg(steps=50, warmup=0.05)) == 3  # 2.5 steps round up: ramp 1/3, 2/3, 1
    assert [lr_at(s, StageCfg(steps=50, warmup=0.05, lr=1.0)) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert warmup_steps(StageCfg(steps=100, warmup=0.07)) == 7  # 0.07 * 100 = 7.000000000000001 is 7 steps
    none = StageCfg(steps=10, warmup=0, lr=1.0, min_lr=0.1)  # no warm-up: cosine from the peak at step 0
    assert lr_at(0, none) == 1.0 and lr_at(9, none) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    one = StageCfg(steps=1, warmup=0.05, lr=1.0)  # a one-step stage trains at the peak
    assert lr_at(0, one) == 1.0 and lr_at(0, StageCfg(steps=1, warmup=0, lr=1.0)) == 1.0
    long = StageCfg(steps=5, warmup=10, lr=1.0)  # warm-up longer than the stage keeps its slope
    assert [lr_at(s, long) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    floored = StageCfg(steps=100, warmup=10, lr=1.0, min_lr=0.3)  # the ramp never dips below min_lr
    assert lr_at(0, floored) == pytest.approx(0.3) and lr_at(5, floored) == pytest.approx(0.6)


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 400), frac=st.floats(0, 0.999), count=st.integers(1, 500), use_count=st.booleans(),
       lr=st.floats(1e-6, 1.0), floor=st.floats(0, 1))
def test_schedule_stays_within_floor_and_peak_and_is_monotone(steps, frac, count, use_count, lr, floor):
    cfg = StageCfg(steps=steps, warmup=count if use_count else frac, lr=lr, min_lr=floor * lr)
    mults = [lr_at(s, cfg) for s in range(steps)]
    lo = cfg.min_lr / cfg.lr
    assert all(lo - 1e-9 <= m <= 1.0 for m in mults)
    warm = min(warmup_steps(cfg), steps)
    ramp, decay = mults[:warm], mults[warm:]
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))           # non-decreasing during warm-up
    assert all(a >= b - 1e-12 for a, b in zip(decay, decay[1:]))  # non-increasing after it
    if warm < steps and warm:
        assert ramp[-1] == 1.0 and decay[0] <= 1.0
