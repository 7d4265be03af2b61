"""Model directories whose config and weights disagree (issue 8, item 5), malformed configs and open_clip local
directories (one line, exit 1), and the one resolver behind teachers, export sources and parity references."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tinyclip_edge.cli import main
from tinyclip_edge.common.errors import UserError
from tinyclip_edge.models import load_model_dir, resolve

TINY_OPEN_CLIP_CFG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 35, "width": 48, "heads": 2, "layers": 2, "eos_id": 34},
    }
}


def _fails(args: list, message: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in lines[0], lines[0]
    return lines[0]


def _edit_config(model_dir: Path, **shape_changes) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    for dotted, value in shape_changes.items():
        node = cfg["shape"]
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    (model_dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision__width": 128}, "tensor(s) differ in shape"),  # config 128, weights 64
        ({"embed_dim": 64}, "differ in shape"),
        ({"text__heads": [2, 2, 2], "text__mlp": [256, 256, 256]}, "tensor(s) missing"),
        ({"vision__heads": [2], "vision__mlp": [256]}, "unexpected tensor(s)"),
    ],
)
def test_config_and_weights_that_disagree_are_an_error_everywhere(tiny_model_dir, tmp_path, change, message):
    _edit_config(tiny_model_dir, **change)
    for args in (
        ["info", tiny_model_dir],
        ["info", tiny_model_dir, "--json"],
        ["eval", tiny_model_dir, "--max-pairs", "4"],
        ["export", tiny_model_dir, "--out", tmp_path / "b", "--quiet"],
        ["bench", tiny_model_dir, "--iters", "2", "--warmup", "0", "--out", tmp_path / "o", "--quiet"],
    ):
        line = _fails(args, message)
        assert "does not match config.json" in line and "model.safetensors" in line
    assert not (tmp_path / "b").exists() and not (tmp_path / "o").exists()


def test_info_reads_the_header_only(tiny_model_dir, monkeypatch):
    """`info` checks shapes from the safetensors header: the weights are never loaded (positive control too)."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("weights were loaded"))
    result = CliRunner().invoke(main, ["info", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert "embedding dim 32" in result.output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"embed_dim": "thirty-two"}, "config.json: field 'shape.embed_dim' must be an integer, got 'thirty-two'"),
        ({"vision__heads": "two"}, "field 'shape.vision.heads' must be a list of an integer"),
        ({"vision__act": "relu"}, "act must be 'gelu' or 'quick_gelu'"),
        ({"embed_dim": -1}, "'shape.embed_dim' must be a positive integer"),
        ({"vision__widht": 3}, "unknown field 'shape.vision.widht' (did you mean 'width'?)"),
    ],
)
def test_malformed_model_config_is_one_line(tiny_model_dir, change, message):
    _edit_config(tiny_model_dir, **change)
    _fails(["info", tiny_model_dir], message)
    with pytest.raises(UserError, match="config.json"):
        load_model_dir(tiny_model_dir)


def test_model_config_top_level_fields(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "tokenizer": {"kind": "words", "vocab": 3}}))
    _fails(["info", tiny_model_dir], "'tokenizer.vocab' must be a list of words")
    (tiny_model_dir / "config.json").write_text(json.dumps({**cfg, "format_version": 7}))
    _fails(["info", tiny_model_dir], "written by a newer tinyclip-edge")


# ------------------------------------------------------------------------------------ open_clip local directories
def _local_dir(tmp_path: Path, config: object, weights: str = "safetensors") -> Path:
    from conftest import tiny_open_clip

    d = tmp_path / "oc"
    d.mkdir()
    (d / "open_clip_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    state = {k: v.contiguous() for k, v in tiny_open_clip().state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(d / "open_clip_model.safetensors"))
    else:

        class Evil:
            def __reduce__(self):
                return (print, ("UNPICKLED-CODE-RAN",))

        torch.save({"state_dict": state, "payload": Evil()}, str(d / "open_clip_pytorch_model.bin"))
    return d


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_cfg": {"embed_dim": 32}}, "missing key 'text_cfg'"),
        ("{not json", "Could not load valid config"),
        ({"model_cfg": {**TINY_OPEN_CLIP_CFG["model_cfg"], "embed_dim": "x"}}, "open_clip could not create"),
    ],
)
def test_local_dir_teacher_with_a_bad_config(tmp_path, config, message):
    d = _local_dir(tmp_path, config)
    for spec in (f"local-dir:{d}", str(d)):
        _fails(["eval", spec, "--max-pairs", "4"], message)


def test_local_dir_with_a_pickled_bin_is_refused_in_one_line(tmp_path, capfd):
    d = _local_dir(tmp_path, TINY_OPEN_CLIP_CFG, weights="pickle")
    _fails(["eval", f"local-dir:{d}", "--max-pairs", "4"], "holds pickled Python objects")
    assert "UNPICKLED-CODE-RAN" not in capfd.readouterr().out


def test_local_dir_with_safetensors_loads(tmp_path):
    """The positive control for the two tests above."""
    d = _local_dir(tmp_path, TINY_OPEN_CLIP_CFG)
    got = resolve.resolve_model(f"local-dir:{d}")
    assert got.kind == "open_clip" and got.spec == f"local-dir:{d.resolve()}" and got.package.shape.embed_dim == 32


# ------------------------------------------------------------------------------------ the one resolver
def test_one_resolver_for_model_dirs(tiny_model_dir):
    from tinyclip_edge.common.integrity import sha256_file
    from tinyclip_edge.compress.teacher import resolve_teacher

    got = resolve.resolve_model(tiny_model_dir)
    assert got.kind == "model_dir" and got.sha256 == sha256_file(tiny_model_dir / "model.safetensors")
    assert resolve.resolve_model(tiny_model_dir, what="model").sha256 == got.sha256
    assert resolve_teacher(str(tiny_model_dir)).shape == got.package.shape


def test_builtin_spec_goes_through_the_registered_hook(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(resolve, "_builtin_hook", None)
    with pytest.raises(UserError, match="built-in teacher, which the compression core trains"):
        resolve.resolve_model("builtin:scenes-teacher")
    asked = []
    resolve.register_builtin(lambda name: asked.append(name) or tiny_model_dir)
    got = resolve.resolve_model("builtin:scenes-teacher")
    assert asked == ["scenes-teacher"] and got.kind == "model_dir"


def test_compression_core_registers_builtin_teachers():
    import tinyclip_edge.compress  # noqa: F401
    from tinyclip_edge.compress.teacher import builtin_teacher

    assert resolve._builtin_hook is builtin_teacher


def test_runner_does_not_import_teacher():
    """The import cycle runner <-> teacher is gone: the runner resolves teachers through models.resolve."""
    from tinyclip_edge.compress import runner

    tree = ast.parse(Path(runner.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "teacher" not in modules and "resolve_teacher" not in names and "teacher" not in names


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "no model given"),
        ("nowhere/model", "model directory not found"),
        ("ViT-B-23", "did you mean"),
    ],
)
def test_resolver_errors(spec, message):
    with pytest.raises(UserError, match=message):
        resolve.resolve_model(spec)


def test_bundle_is_not_a_model(tmp_path, tiny_model_dir):
    from tinyclip_edge.export import export_bundle

    bundle = export_bundle(tiny_model_dir, tmp_path / "b", progress=False, verify=False)
    with pytest.raises(UserError, match="is an export bundle, not a model"):
        resolve.resolve_model(bundle)
