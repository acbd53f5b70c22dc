"""open_clip backbones, chosen by name, loaded without touching the network unless a download tag is asked for.

The project registers its own small configs (`model_configs/*.json`, random init) so that defaults, tests and
benchmarks run offline on a CPU. Any open_clip model name works for real use, with `pretrained=` a local
checkpoint file (safetensors, or a torch file loaded with `weights_only=True`) or an open_clip tag (which needs
the network).
"""

from __future__ import annotations

import functools
from pathlib import Path

import open_clip
from torch import nn

from cliptime.errors import CliptimeError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


def check_backbone(model_name: str, pretrained: str = "") -> None:
    """Fail fast, naming the input, on an unknown model name or a pretrained file that does not exist."""
    if model_name not in open_clip.list_models():
        raise CliptimeError(
            f"unknown open_clip model name {model_name!r} (e.g. cliptime-tiny-rn, ViT-B-32; "
            "see open_clip.list_models())"
        )
    if pretrained and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise CliptimeError(
                f"pretrained weights {pretrained!r} for {model_name}: no such file, and not an open_clip tag "
                f"({', '.join(tags) or 'this model has none'})"
            )


def create_backbone(model_name: str, pretrained: str = "") -> tuple[nn.Module, dict]:
    """Return (open_clip model, its preprocess config with mean/std and image size)."""
    check_backbone(model_name, pretrained)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, weights_only=True)
    except (RuntimeError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliptimeError(
            f"could not load pretrained weights {pretrained!r} for {model_name}: {first_line}"
        ) from None
    return model, open_clip.get_model_preprocess_cfg(model)


def embed_dim(model_name: str) -> int:
    return open_clip.get_model_config(model_name)["embed_dim"]


@functools.cache
def tokenizer_for(model_name: str):
    """The model's own tokenizer (CLIP BPE with vocab 49408 for the project's configs).

    Cached per process: building it reads the BPE vocabulary, and Ray Data calls the preprocessor in
    many short tasks on the same worker processes."""
    return open_clip.get_tokenizer(model_name)


def image_size(model_name: str) -> tuple[int, int]:
    """The model's input image size, read from its config without building the model."""
    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    return (size, size) if isinstance(size, int) else tuple(size)
