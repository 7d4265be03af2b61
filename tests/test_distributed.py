"""Distributed training on CPU: 2 gloo processes (spawned like torchrun would) against one process.

Tolerances: losses agree to 1e-5 and gradients to rtol 1e-4 / atol 1e-6 (summation order differs between
a batch of 8 and two of 4); after 4 Adam steps the learned-mask state agrees to 1e-4 (identical ACROSS
ranks: bit for bit); a run resumed with another world size ends within 1e-3 of the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import _dist_workers as W
import pytest
import torch
from safetensors.torch import load_file

from tinyclip_edge.common import dist
from tinyclip_edge.common.errors import UserError


def _close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=rtol, atol=atol), (k, (v - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """One step and a short learned-mask stage, in one process and in two (one launch each)."""
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    W.launch(W.step_and_stage, 2, str(multi))
    W.launch(W.step_and_stage, 1, str(single))
    return single, multi


def test_one_step_losses_and_gradients_equal_one_process(runs):
    single, multi = runs
    ref = json.loads((single / "parts-0.json").read_text())
    for r in (0, 1):
        got = json.loads((multi / f"parts-{r}.json").read_text())
        for kind in ("distill", "prune"):
            assert got[kind]["local_rows"] == 4 and ref[kind]["local_rows"] == 8  # each rank held half the batch
            for term in ("affinity", "clip", "total"):
                assert got[kind][term] == pytest.approx(ref[kind][term], abs=1e-5), (kind, term)
            g_ref = load_file(str(single / f"{kind}-grads-0.safetensors"))
            g = load_file(str(multi / f"{kind}-grads-{r}.safetensors"))
            _close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert "lambdas" in g and g["lambdas"].abs().sum() > 0  # the Lagrange multipliers' gradient was synced too


def test_learned_mask_stage_keeps_masks_and_multipliers_identical_on_all_ranks(runs):
    single, multi = runs
    s0, s1 = (load_file(str(multi / f"prune-state-{r}.safetensors")) for r in (0, 1))
    ref = load_file(str(single / "prune-state-0.safetensors"))
    gates = [k for k in s0 if k.startswith("gates.")]
    assert gates and "lambdas" in s0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert s0["lambdas"].abs().sum() > 0  # the multipliers really moved
    _close(s0, ref, rtol=1e-4, atol=1e-4)
    # rank 0 alone wrote the log and the checkpoint, counting GLOBAL samples
    lines = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["samples"] == 4 * 16
    meta = json.loads((multi / "ckpt" / "checkpoint.json").read_text())
    assert meta["world_size"] == 2 and meta["samples"] == 64


def test_rank0_sections_run_alone_and_their_errors_reach_every_rank(runs):
    _, multi = runs
    r0, r1 = (json.loads((multi / f"sections-{r}.json").read_text()) for r in (0, 1))
    assert r0["seen"] == 1 and r1["seen"] is None  # rank 0 ran it, as a single process; rank 1 waited
    assert r0["message"] == "the teacher could not be downloaded"
    assert r1["message"] == "rank 0 failed: the teacher could not be downloaded"


def _overrides(run_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"teacher={teacher}",
        "baselines.scratch=false",
        "eval.data=null",
        "stages.0.steps=6",
        "stages.0.batch_size=16",
        "stages.0.checkpoint_every=3",
        "stages.1.method=prune",
        "stages.1.steps=5",
        "stages.1.batch_size=16",
        *extra,
    ]


def test_resume_with_a_different_world_size_continues_the_same_run(tmp_path, tiny_model_dir, caplog):
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress
    from tinyclip_edge.models import load_model_dir

    straight = run_compress(load_recipe("quickstart", _overrides(tmp_path / "a", tiny_model_dir)))
    W.launch(W.run_recipe, 2, _overrides(tmp_path / "b", tiny_model_dir), 4)  # both ranks stop at step 4
    meta = json.loads((tmp_path / "b" / "checkpoints" / "stage-1" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["samples"] == 48
    with caplog.at_level(logging.WARNING, logger="tinyclip_edge"):
        resumed = run_compress(load_recipe("quickstart", _overrides(tmp_path / "b", tiny_model_dir)), resume=True)
    assert "written by 2 process(es), this run has 1" in caplog.text and "48 global samples" in caplog.text
    # 11 AdamW steps after sums reduced in another order (2 processes, other thread counts): Adam's early,
    # sign-like updates amplify rounding, so weights agree to 1e-3 (they move by ~1e-2 per step at lr 1e-3)
    for a, b in zip(straight.stage_dirs, resumed.stage_dirs):
        _close(load_model_dir(b).model.state_dict(), load_model_dir(a).model.state_dict(), rtol=1e-2, atol=1e-3)


def test_nccl_without_a_gpu_says_use_gloo():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: nccl is a valid choice here")
    with pytest.raises(UserError, match="use distributed.backend=gloo"):
        dist.choose_backend("nccl", "cpu")
    assert dist.choose_backend("auto", "cpu") == "gloo" and dist.choose_backend("gloo", "cpu") == "gloo"
    with pytest.raises(UserError, match="must be one of"):
        dist.choose_backend("mpi", "cpu")


def test_nccl_on_cpu_is_one_line_from_the_cli(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from tinyclip_edge.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: nccl is a valid choice here")
    res = CliRunner().invoke(
        main,
        [
            "compress",
            "quickstart",
            f"run_dir={tmp_path / 'r'}",
            f"teacher={tiny_model_dir}",
            "distributed.backend=nccl",
            "device=cpu",
        ],
    )
    assert res.exit_code == 1 and "use distributed.backend=gloo" in res.output and "Traceback" not in res.output


def test_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, tmp_path, tiny_model_dir):
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import check_world_split

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    check_world_split(load_recipe("quickstart", _overrides(tmp_path / "r", tiny_model_dir)))  # 16 over 2: fine
    with pytest.raises(UserError, match="does not split evenly into grad_accum 1 x 2 processes; use a multiple of 2"):
        check_world_split(
            load_recipe("quickstart", _overrides(tmp_path / "r", tiny_model_dir, "stages.0.batch_size=15"))
        )


def test_ranks_with_different_recipes_or_an_uneven_shard_split_are_refused_on_every_rank(tmp_path, tiny_model_dir):
    from tinyclip_edge.data.build import build_shards

    build_shards("scenes:val:32", tmp_path / "shards", 8, image_size=32, progress=False)  # 4 shards
    out = tmp_path / "out"
    out.mkdir()
    W.launch(W.start_checks, 2, str(out), str(tiny_model_dir), str(tmp_path / "shards"))
    for r in (0, 1):
        seen = json.loads((out / f"start-{r}.json").read_text())
        assert "rank 1 was started with another recipe than rank 0 (stages.0.lr: 0.001 → 0.002)" in seen["lr"]
        assert "3 readable shard(s) do not split evenly over 2 processes" in seen["shards"]
        assert seen["even"] is None  # positive control: the same recipe on 4 shards trains
    assert not (out / "lr").exists() and not (out / "shards" / "run.json").exists()  # refused before any write
    assert (out / "even" / "stage-2" / "config.json").is_file()
