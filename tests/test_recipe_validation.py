"""Every recipe value is validated when the recipe is loaded, before any work (issue 8, items 1 and 4).

Each bad value is one line and exit 1 through the CLI (CliRunner), next to a positive control that shows the
nearest valid value loading. Nothing here trains: load-time errors come before the teacher is resolved.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.compress.recipe import load_recipe


def _fails(args: list[str], message: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0, result.output
    assert message in result.output, result.output
    return result.output


# (override, expected message, the nearest valid override: the positive control)
CASES = [
    (
        "export.on_parity_failure=erorr",
        "'export.on_parity_failure' must be one of error, warn, got 'erorr' (did you mean 'error'?)",
        "export.on_parity_failure=warn",
    ),
    (
        "stages.0.precision=fp61",
        "'stages.0.precision' must be one of auto, fp32, bf16, got 'fp61'",
        "stages.0.precision=bf16",
    ),
    (
        "stages.0.losses={affinity: -1}",
        "stages.0.losses.affinity: the weight must be a finite number >= 0, got -1",
        "stages.0.losses={affinity: 0, clip: 1}",
    ),
    (
        "stages.0.losses={affinity: .nan}",
        "the weight must be a finite number >= 0, got nan",
        "stages.0.losses={affinity: {weight: 2.5}}",
    ),
    (
        "stages.0.losses={affinity: 0}",
        "every loss weight is 0: nothing would be trained",
        "stages.0.losses={affinity: 1e-3}",
    ),
    ("stages.0.grad_clip=-1", "'stages.0.grad_clip' must be a number > 0, got -1", "stages.0.grad_clip=null"),
    ("stages.0.weight_decay=-1", "'stages.0.weight_decay' must be a number >= 0, got -1", "stages.0.weight_decay=0"),
    (
        "stages.0.prune.mask_steps=1.5",
        "'stages.0.prune.mask_steps' must be a number in (0, 1), got 1.5",
        "stages.0.prune.mask_steps=0.99",
    ),
    (
        "stages.0.method=continue",
        "'stages.0.method' must be one of inherit, prune, scratch, dclip-meta, got 'continue'",
        "stages.0.method=prune",
    ),
    ("stages.0.lr=-1", "'stages.0.lr' must be a number > 0, got -1", "stages.0.lr=1e-4"),
    (
        "stages.0.prune.lambda_lr=-1",
        "'stages.0.prune.lambda_lr' must be a number > 0, got -1",
        "stages.0.prune.lambda_lr=0.5",
    ),
    (
        "stages.0.prune.eval_gates=cofy",
        "'stages.0.prune.eval_gates' must be one of louizos, cofi, got 'cofy' (did you mean 'cofi'?)",
        "stages.0.prune.eval_gates=cofi",
    ),
    (
        "stages.0.prune.lagrangian=onesided",
        "'stages.0.prune.lagrangian' must be one of two-sided, one-sided, got 'onesided' (did you mean 'one-sided'?)",
        "stages.0.prune.lagrangian=one-sided",
    ),
    (
        "stages.0.prune.log_alpha=clamp",
        "'stages.0.prune.log_alpha' must be one of free, clamped, got 'clamp' (did you mean 'clamped'?)",
        "stages.0.prune.log_alpha=clamped",
    ),
    (
        "stages.0.prune.sparsity=block",
        "'stages.0.prune.sparsity' must be one of tower, blocks, got 'block' (did you mean 'blocks'?)",
        "stages.0.prune.sparsity=blocks",
    ),
    (
        "stages.0.prune.round_hidden_to_head=32",
        "'stages.0.prune.round_hidden_to_head' must be true or false, got 32",
        "stages.0.prune.round_hidden_to_head=true",
    ),
    ("stages.0.log_every=0", "'stages.0.log_every' must be an integer >= 1, got 0", "stages.0.log_every=1"),
    (
        "stages.0.checkpoint_every=0",
        "'stages.0.checkpoint_every' must be an integer >= 1, got 0",
        "stages.0.checkpoint_every=1",
    ),
    ("stages.0.min_lr=0.5", "stages.0.min_lr 0.5 is above stages.0.lr 0.001", "stages.0.min_lr=0.001"),
    (
        "stages.0.grad_accum=3",
        "stages.0.batch_size 128 is not divisible by stages.0.grad_accum 3",
        "stages.0.grad_accum=4",
    ),
    ("data.train=scenes:val:-5", "bad scenes size '-5' in 'scenes:val:-5'", "data.train=scenes:val:5"),
    ("eval.data=scenes:test", "unknown scenes data 'scenes:test'", "eval.data=scenes:calib"),
    ("export.calib=images/", "export.calib 'images/' is not a data spec", "export.calib=images/list.csv"),
    ("device=bogus", "'device' must be a device: auto, cpu, cuda or cuda:N, got 'bogus'", "device=cpu"),
    ("export.models=x", "'export.models' must be one of all, students, last, got 'x'", "export.models=last"),
    (
        "export.precisions=[fp32, fp32]",
        "export.precisions must list one or more distinct precisions",
        "export.precisions=[fp32, fp16]",
    ),
    ("export.exporter=dynamo", "export.exporter dynamo writes opset 18 or newer", "export.opset=18"),
    ("bench.precisions=[fp16]", "bench.precisions ['fp16'] are not exported", "bench.precisions=[fp32]"),
    ("bench.backend=trt", "bench.backend: the pipeline times ONNX bundles", "bench.backend=onnxrt"),
    ("bench.iters=1", "'bench.iters' must be an integer >= 2, got 1", "bench.iters=2"),
    (
        "engines={batch_profile: [8, 1, 32]}",
        "engines.batch_profile must satisfy 1 <= MIN <= OPT <= MAX, got 8,1,32",
        "engines={batch_profile: [1, 8, 32]}",
    ),
    (
        "engines={batch_profile: [1, 8]}",
        "engines.batch_profile needs three integers",
        "engines={batch_profile: [1, 1, 1]}",
    ),
    ("engines={dla_core: -1}", "'engines.dla_core' must be an integer >= 0, got -1", "engines={dla_core: 0}"),
    (
        "engines={workspace_mb: 0}",
        "'engines.workspace_mb' must be an integer >= 1, got 0",
        "engines={workspace_mb: 64}",
    ),
    ("engines={calib: scenes:calib}", "engines.calib: the pipeline builds each engine in its bundle's", "engines={}"),
    (
        "engines={calib_cache: c.cache}",
        "engines.calib_cache: the pipeline builds each engine in its bundle's own precision",
        "engines={calib_cache: null}",
    ),
    ("engines={precisions: [fp16]}", "engines.precisions ['fp16'] are not exported", "engines={precisions: [fp32]}"),
    ("engines={precisions: [int8-dynamic]}", "'engines.precisions.0' must be one of", "engines={precisions: null}"),
    (
        "baselines.scratch_loss=affinity",
        "'baselines.scratch_loss' must be one of clip, got 'affinity'",
        "baselines.scratch_loss=clip",
    ),
    (
        "stages.1.shape={image: {layers: 0}}",
        "'stages.1.shape.image.layers' must be an integer in [1, 1e+06], got 0",
        "stages.1.shape={image: {layers: 1, mlp: [0]}}",
    ),
    ("stages.1.shape=vit-b-99", "stages.1.shape: unknown model preset 'vit-b-99'", "stages.1.shape=scenes-tiny"),
]


@pytest.mark.parametrize("bad, message, good", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_value_is_one_line_and_exit_1(tmp_path, bad, message, good):
    run_dir = tmp_path / "run"
    _fails(["compress", "quickstart", f"run_dir={run_dir}", bad], message)
    assert not run_dir.exists()  # refused before any work: no run directory was made
    load_recipe("quickstart", [f"run_dir={run_dir}", good])  # positive control: the nearest valid value loads


def test_an_engines_section_needs_an_export_tensorrt_builds():
    with pytest.raises(UserError, match=r"engines: export.precisions \['int8-dynamic'\] has none TensorRT builds"):
        load_recipe("quickstart", ["engines={}", "export.precisions=[int8-dynamic]"])
    with pytest.raises(UserError, match="an engines: section needs an export: section"):
        load_recipe("quickstart", ["engines={}", "export=null", "bench=null"])
    load_recipe("quickstart", ["engines={}", "export.precisions=[int8-dynamic, fp16]"])  # positive control


def test_warmup_must_be_a_fraction_or_fewer_steps_than_the_stage():
    with pytest.raises(
        UserError,
        match=r"stages.0.warmup must be a fraction of the steps in \[0, 1\) or a whole "
        r"number of steps below stages.0.steps \(2\), got 5",
    ):
        load_recipe("quickstart", ["stages.0.steps=2", "stages.0.warmup=5"])
    _fails(["compress", "quickstart", "stages.0.steps=2", "stages.0.warmup=5"], "stages.0.warmup must be")
    with pytest.raises(UserError, match="got 1.5"):
        load_recipe("quickstart", ["stages.0.steps=10", "stages.0.warmup=1.5"])  # neither a fraction nor steps
    assert load_recipe("quickstart", ["stages.0.steps=2", "stages.0.warmup=1"]).stages[0].warmup == 1
    assert load_recipe("quickstart", ["stages.0.steps=2", "stages.0.warmup=0.99"]).stages[0].warmup == 0.99


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_cuda_device_on_a_machine_without_one():
    _fails(["compress", "quickstart", "device=cuda"], "device 'cuda' requested but no CUDA GPU is available here")
    _fails(["eval", "no-model", "--device", "cuda"], "--device 'cuda' requested but no CUDA GPU is available here")
    _fails(["run", "quickstart", "bench.device=cuda"], "bench.device 'cuda' requested but no CUDA GPU")


def test_duplicate_yaml_keys_are_errors_with_their_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(
        "name: dup\nteacher: builtin:scenes-teacher\nstages:\n  - steps: 2\n    lr: 0.001\n    steps: 3000\n"
    )
    _fails(
        ["compress", recipe, f"run_dir={tmp_path / 'run'}"],
        "is not valid YAML: duplicate key 'steps' (line 4 and line 6); keep one",
    )
    assert not (tmp_path / "run").exists()
    _fails(["compress", "quickstart", "stages.0.losses={clip: 1, clip: 2}"], "duplicate key 'clip'")
    # positive control: one `steps`, and YAML merge keys may still override what they merge in
    recipe.write_text("name: dup\nstages:\n  - &s {steps: 2, lr: 0.001}\n  - {<<: *s, steps: 3}\n")
    assert [s.steps for s in load_recipe(str(recipe)).stages] == [2, 3]


@pytest.mark.parametrize(
    "name, message",
    [
        ("../../victim", "'stages.0.name' must be a plain name"),
        (".", "'stages.0.name' must be a plain name"),
        ("..", "'stages.0.name' must be a plain name"),
        ("/tmp/abs", "'stages.0.name' must be a plain name"),
        ("-rf", "'stages.0.name' must be a plain name"),
        ("x.masks", "'stages.0.name' must be a plain name"),
        ("teacher", "stages.0.name 'teacher' is reserved"),
        ("Checkpoints", "stages.0.name 'Checkpoints' is reserved"),
        ("baselines", "stages.0.name 'baselines' is reserved"),
        ("export", "stages.0.name 'export' is reserved"),
        ("stage-2", "stages.1.name 'stage-2' is already the name of stages.0"),
    ],
)
def test_stage_names_cannot_reach_outside_the_run_or_collide(tmp_path, name, message):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    run_dir = tmp_path / "a" / "b"
    _fails(["compress", "quickstart", f"run_dir={run_dir}", f"stages.0.name={name}"], message)
    assert (victim / "keep.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_valid_stage_names_and_defaults():
    r = load_recipe("quickstart", ["stages.0.name=small_1", "stages.1.name=null"])
    assert [s.name for s in r.stages] == ["small_1", "stage-2"]
    # a default name that an explicit one already took is a clash too, reported as such
    with pytest.raises(UserError, match="stages.1.name 'stage-2' is already the name of stages.0"):
        load_recipe("quickstart", ["stages.0.name=stage-2", "stages.1.name=null"])


def test_run_refuses_a_bad_export_or_bench_section_before_training(tmp_path):
    run_dir = tmp_path / "run"
    _fails(["run", "quickstart", f"run_dir={run_dir}", "export.models=x"], "'export.models' must be one of")
    _fails(["run", "quickstart", f"run_dir={run_dir}", "export=null"], "a bench: section needs an export: section")
    _fails(["run", "quickstart", f"run_dir={run_dir}", "bench.seconds=0"], "'bench.seconds' must be a number > 0")
    _fails(["quickstart", "--run-dir", run_dir, "export.calib_method=kl"], "'export.calib_method' must be one of")
    assert not run_dir.exists()


def test_eval_options_are_validated_before_any_model_is_read(tmp_path):
    _fails(["eval", tmp_path / "no-model", "--batch-size", "0"], "option '--batch-size' must be an integer >= 1, got 0")
    _fails(["eval", tmp_path / "no-model", "--max-pairs", "-1"], "option '--max-pairs' must be an integer >= 1")
    _fails(
        ["eval", tmp_path / "no-model", "--data", "scenes:val:-5"],
        "bad scenes size '-5' in 'scenes:val:-5': the number of pairs must be a positive integer",
    )
    _fails(
        ["eval", tmp_path / "no-model", "--device", "bogus"],
        "option '--device' must be a device: cpu, cuda or cuda:N, got 'bogus'",
    )
    # positive control: valid options get as far as reading the (missing) model
    out = CliRunner().invoke(main, ["eval", str(tmp_path / "no-model"), "--batch-size", "1", "--data", "scenes:val:5"])
    assert out.exit_code == 1 and "no-model" in out.output and "must be" not in out.output


def test_bad_override_paths_are_user_errors():
    with pytest.raises(UserError, match="'stages.0.steps' is 120, not a mapping or a list"):
        load_recipe("quickstart", ["stages.0.steps.x=1"])
    with pytest.raises(UserError, match="no index 5"):
        load_recipe("quickstart", ["stages.5.steps=1"])


def recipe_table() -> str:
    """The table of docs/GUARANTEES.md: every recipe key, its domain (as error messages state it) and default.
    Regenerate: python -c "import sys; sys.path.insert(0, 'tests'); from test_recipe_validation import
    recipe_table; print(recipe_table())" """
    import dataclasses
    import types
    import typing

    from tinyclip_edge.common.typed import describe_type
    from tinyclip_edge.compress.recipe import Recipe

    rows = ["| key | domain | default |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            tp = inner = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                inner = args[0] if len(args) == 1 else tp
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}.")
            elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
                walk(typing.get_args(inner)[0], f"{prefix}{f.name}.N.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append(f"| `{prefix}{f.name}` | {describe_type(tp).replace('|', 'or')} | `{default!r}` |")

    walk(Recipe, "")
    return "\n".join(rows)


def test_the_documented_recipe_table_is_the_schema():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "GUARANTEES.md").read_text()
    assert recipe_table() in doc, "docs/GUARANTEES.md's recipe table is stale; regenerate it (see recipe_table)"
