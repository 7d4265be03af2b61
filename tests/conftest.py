"""Shared fixtures: tiny models built in code (width 32-64, 1-2 layers, 32 px images), saved to tmp dirs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Tests never touch the network: huggingface_hub fails fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# File digests (and built-in teachers) are cached under the user cache dir: keep the tests' cache to themselves.
_CACHE = tempfile.mkdtemp(prefix="tinyclip-edge-test-cache-")
os.environ.setdefault("TINYCLIP_EDGE_CACHE", _CACHE)
atexit.register(shutil.rmtree, _CACHE, True)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _steady_thread_choice(request, monkeypatch):
    """Runs in one test pick the same CPU thread count whatever else loads the machine: `cpu_threads: auto`
    reads the load at start (common/threads.py), and two runs that a test compares bit for bit (exact resume)
    would differ in float rounding if a busy moment gave one of them 1 thread and the other 2. The tests of
    the choice itself (test_threads.py) see the real load."""
    if request.module.__name__ != "test_threads":
        monkeypatch.setattr("tinyclip_edge.common.threads.busy_cores", lambda sample_s=0.3: 0.0)


# the quickstart recipe cut to two 2-step stages with no evaluation, export or bench: what every run-directory
# test needs and no more
FAST_QUICKSTART = [
    "baselines.scratch=false",
    "eval.data=null",
    "export=null",
    "bench=null",
    "stages.0.steps=2",
    "stages.0.batch_size=8",
    "stages.1.steps=2",
    "stages.1.batch_size=8",
]


def make_package(shape=None, seed: int = 0, jitter: float = 0.0):
    """A randomly initialised ClipPackage for the scenes data (words tokenizer, 32 px)."""
    from tinyclip_edge.common.preprocess import Preprocess
    from tinyclip_edge.data import scenes
    from tinyclip_edge.models import ClipModel, ClipPackage
    from tinyclip_edge.models.presets import preset_shape

    torch.manual_seed(seed)
    shape = shape or preset_shape("scenes-tiny")
    model = ClipModel(shape).eval()
    if jitter:  # non-trivial LayerNorm weights and biases, so conversions are really tested
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * jitter)
    pre = Preprocess.from_dict(scenes.preprocess_config(shape.vision.image_size))
    tok = scenes.tokenizer_config(shape.text.context_length)
    return ClipPackage(model, pre, tok, {"teacher": "test", "stage": "test"})


def pruned_shape():
    """Per-layer widths as auto-pruning produces them: uneven heads/MLP, a layer without MLP,
    a hidden width narrower than heads x head_dim."""
    from tinyclip_edge.models import ClipShape, TextShape, VisionShape

    return ClipShape(
        embed_dim=32,
        vision=VisionShape(width=48, head_dim=16, heads=[3, 1], mlp=[96, 0], image_size=32, patch_size=8),
        text=TextShape(width=40, head_dim=16, heads=[2, 1], mlp=[0, 64], context_length=24, vocab_size=35),
    ).validate()


@pytest.fixture
def tiny_package():
    return make_package(jitter=0.02)


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_package) -> Path:
    from tinyclip_edge.models import save_model_dir

    return save_model_dir(tiny_package, tmp_path / "tiny")


@pytest.fixture
def pruned_model_dir(tmp_path: Path) -> Path:
    from tinyclip_edge.models import save_model_dir

    return save_model_dir(make_package(pruned_shape(), jitter=0.02), tmp_path / "pruned")


def tiny_open_clip(
    text_pool: str = "argmax",
    custom_text: bool = False,
    quick_gelu: bool = False,
    layer_scale: bool = False,
    image_pool: str = "tok",
):
    """A small open_clip CLIP with random (jittered) weights; scenes-compatible sizes."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    torch.manual_seed(1)
    v = CLIPVisionCfg(
        image_size=32,
        patch_size=8,
        width=64,
        layers=2,
        head_width=32,
        pool_type=image_pool,
        ls_init_value=0.5 if layer_scale else None,
    )
    t = CLIPTextCfg(
        context_length=24,
        vocab_size=35,
        width=48,
        heads=2,
        layers=2,
        pool_type=text_pool,
        eos_id=34,
        ls_init_value=0.5 if layer_scale else None,
    )
    cls = CustomTextCLIP if custom_text else CLIP
    model = cls(embed_dim=32, vision_cfg=v, text_cfg=t, quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture
def open_clip_checkpoint(tmp_path: Path) -> str:
    """A teacher spec 'CONFIG.json:CKPT.pt' pointing at a random open_clip model saved to disk."""
    import json

    from tinyclip_edge.data import scenes

    model = tiny_open_clip()
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 24, "vocab_size": 35, "width": 48, "heads": 2, "layers": 2, "eos_id": 34},
        "tokenizer": scenes.tokenizer_config(24),
    }  # a 35-token vocabulary: the scenes word tokenizer
    cfg_path = tmp_path / "tiny_open_clip.json"
    cfg_path.write_text(json.dumps(cfg))
    ckpt = tmp_path / "tiny_open_clip.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return f"{cfg_path}:{ckpt}"


@pytest.fixture
def teacher_dir(tmp_path, tiny_package):
    """The tiny random teacher saved as a model directory (run-directory and CLI tests)."""
    from tinyclip_edge.models import save_model_dir

    return save_model_dir(tiny_package, tmp_path / "teacher")


@pytest.fixture(scope="session")
def trained_teacher_dir(tmp_path_factory) -> Path:
    """A scenes-tiny CLIP really trained on scenes (about 30 s on 2 cores), through the packaged
    teacher recipe and the real runner. Shared by every test that needs a teacher that knows something."""
    from tinyclip_edge.compress.recipe import load_recipe
    from tinyclip_edge.compress.runner import run_compress

    run_dir = tmp_path_factory.mktemp("trained-teacher") / "run"
    recipe = load_recipe(
        "scenes-teacher",
        [
            f"run_dir={run_dir}",
            "stages.0.shape=scenes-tiny",
            "stages.0.steps=150",
            "stages.0.batch_size=64",
            "stages.0.lr=0.003",
            "stages.0.log_every=50",
        ],
    )
    return run_compress(recipe).stage_dirs[0]


@pytest.fixture
def manifest_reads(monkeypatch):
    """The bundle manifests read (and verified) during the test, in order: BundleManifest.read still runs,
    counted (the "a command reads a manifest once" tests)."""
    from tinyclip_edge.common.formats.bundle import BundleManifest

    real, reads = BundleManifest.read.__func__, []

    def counted(cls, *args, **kwargs):
        reads.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(BundleManifest, "read", classmethod(counted))
    return reads
