"""Shared fixtures: tiny models built once per session, real sample images, CPU thread limits."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    # CI has 2 cores; more threads only contend. OMP_NUM_THREADS=1 is honoured (a shared dev machine
    # running several jobs on 2 cores)
    try:
        import torch

        n = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(n) if n.isdigit() and int(n) > 0 else 2)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from vlm_judge.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_text_lm_dir(tmp_path_factory):
    from vlm_judge.tiny_models import build_tiny_text_lm

    return build_tiny_text_lm(tmp_path_factory.mktemp("tiny_text_lm"))


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """Real photos from scikit-image's bundled samples, saved as files: {name: path}."""
    from PIL import Image
    from skimage import data

    d = tmp_path_factory.mktemp("images")
    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        p = d / f"{name}.png"
        Image.fromarray(getattr(data, name)()).resize((64, 64)).save(p)
        out[name] = p
    return out
