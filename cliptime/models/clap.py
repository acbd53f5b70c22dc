"""laion_clap's CLAP model behind one offline-safe loader.

Why the import below is unusual: `import laion_clap` runs `laion_clap/__init__.py`, which imports
`laion_clap/hook.py` and through it `laion_clap/training/data.py`, and that module downloads the BERT, RoBERTa
and BART tokenizers from the Hugging Face hub *at import time*: offline it hangs. The model code itself lives in
the subpackage `laion_clap.clap_module` (`create_model`, `tokenize`, PANN and HTSAT audio encoders), which needs
nothing from the network with the `transformer` text branch. So we put a bare package object for `laion_clap`
into `sys.modules` (its `__path__` only, its `__init__` not run) and import the subpackage through it. This is
the only place in cliptime that imports laion_clap.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cliptime.errors import CliptimeError

CONFIG_DIR = Path(__file__).parent / "model_configs"


def clap_module() -> types.ModuleType:
    """`laion_clap.clap_module`, imported without running `laion_clap/__init__.py` (see the module docstring)."""
    if "laion_clap.clap_module" in sys.modules:
        return sys.modules["laion_clap.clap_module"]
    if "laion_clap" not in sys.modules:
        spec = importlib.util.find_spec("laion_clap")
        if spec is None:
            raise CliptimeError("laion_clap is not installed (pip install laion-clap)")
        package = types.ModuleType("laion_clap")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["laion_clap"] = package
    module = importlib.import_module("laion_clap.clap_module")
    module.add_model_config(CONFIG_DIR)
    return module


TEXT_BRANCHES = ("transformer", "roberta", "bert", "bart")
_HF_NAMES = {"roberta": "roberta-base", "bert": "bert-base-uncased", "bart": "facebook/bart-base"}


@functools.cache
def hf_tokenizer(text_model: str):
    """The Hugging Face tokenizer of a pretrained text branch (roberta/bert/bart), from the local cache only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_HF_NAMES[text_model], local_files_only=True)


def tokenize(texts: list[str], text_model: str, context_length: int) -> torch.Tensor:
    """Token ids of `texts` (batch, context_length) for the text branch: CLIP's BPE for `transformer`, the
    pretrained model's own tokenizer for roberta/bert/bart, padded with its pad id (`CLAPEncoder.embed_text` masks
    those out)."""
    if text_model == "transformer":
        return clap_module().tokenize(list(texts), context_length=context_length)
    encoded = hf_tokenizer(text_model)(
        list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="pt"
    )
    return encoded["input_ids"]


def _hf_model_cached(name: str) -> bool:
    """Whether `from_pretrained(name)` finds the model's config and weights in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(file: str) -> bool:
        return isinstance(try_to_load_from_cache(name, file), str)

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))


def check_clap(audio_model: str, text_model: str, pretrained: str = "") -> dict:
    """Fail fast on an unknown config, an unavailable text branch or a missing checkpoint; return the config."""
    module = clap_module()
    if audio_model not in module.list_models():
        raise CliptimeError(f"unknown CLAP audio model {audio_model!r} (known: {', '.join(module.list_models())})")
    if text_model not in TEXT_BRANCHES:
        raise CliptimeError(f"unknown CLAP text branch {text_model!r} (known: {', '.join(TEXT_BRANCHES)})")
    if text_model != "transformer":
        # laion_clap builds the branch with `from_pretrained(name)`: its tokenizer and weights must be cached here
        # (and on every worker), or the workers fail one by one after the driver has started them
        name = _HF_NAMES[text_model]
        try:
            usable = hf_tokenizer(text_model).pad_token_id is not None and _hf_model_cached(name)
        except (OSError, ValueError):  # files missing, or present but unreadable
            usable = False
        if not usable:
            raise CliptimeError(
                f"the {text_model} text branch needs {name}'s tokenizer (with a padding token), config and weights "
                "in the Hugging Face cache (offline: use --text-model transformer)"
            )
    if pretrained and not Path(pretrained).is_file():
        raise CliptimeError(f"CLAP checkpoint {pretrained} does not exist")
    return module.factory._MODEL_CONFIGS[audio_model]


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """A LAION checkpoint (e.g. 630k-audioset-best.pt): tensors only, `module.` prefixes from DDP removed."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or non-tensor files
        raise CliptimeError(f"CLAP checkpoint {path} cannot be loaded safely: {str(e).splitlines()[0]}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # Checkpoints saved with older transformers carry this buffer; newer model code has none.
    state.pop("text_branch.embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("audio_branch.spectrogram")]:
        raise CliptimeError(
            f"CLAP checkpoint {path} does not fit the chosen model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected keys): check --audio-model and --text-model"
        )


def order_features(frames: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """Frame embeddings (batch, time, dim) weighted by a ramp around the sound's own temporal centre.

    The ramp runs from negative before the loudness-weighted centre of the clip to positive after it, scaled by
    the sound's spread in time, and each frame counts by its loudness. A clip of A then B thus gives about
    "B minus A" wherever the pair sits in the clip, and a single event gives its own early-to-late change
    (rising vs. falling) wherever it sits: a ramp over the whole clip would move a single event's embedding with
    its position in the clip, which says nothing about the event.
    """
    loudness = F.adaptive_avg_pool1d(audio.abs().float().unsqueeze(1), frames.shape[1]).squeeze(1)
    weight = loudness / loudness.sum(1, keepdim=True).clamp(min=1e-8)
    t = torch.linspace(-1.0, 1.0, frames.shape[1], device=frames.device)
    centre = (weight * t).sum(1, keepdim=True)
    spread = (weight * (t - centre) ** 2).sum(1, keepdim=True).sqrt().clamp(min=1e-3)
    ramp = weight * (t - centre) / spread
    return (frames * ramp.to(frames.dtype).unsqueeze(-1)).sum(1)


def waveform(audio: torch.Tensor) -> torch.Tensor:
    """Float samples in [-1, 1] of a batch of clips given as 16-bit PCM integers (the data path ships them so: half
    the bytes of float32 through Ray's object store and to the device) or as floats already."""
    return audio if audio.is_floating_point() else audio.float() / 32767.0


class CLAPEncoder(nn.Module):
    """A CLAP model as two embedders: waveform -> unit vector, token ids -> unit vector, plus a logit scale.

    One `forward` embeds a batch of clips and any number of caption batches, so DDP sees one call per step.
    """

    def __init__(
        self,
        audio_model: str,
        text_model: str,
        pretrained: str = "",
        spec_time_drop: int = 0,
        order_pooling: bool = False,
    ):
        super().__init__()
        cfg = check_clap(audio_model, text_model, pretrained)
        module = clap_module()
        self.clap, _ = module.create_model(audio_model, text_model, pretrained="", enable_fusion=False)
        if pretrained:
            _load_checkpoint(self.clap, pretrained)
        audio_cfg = cfg["audio_cfg"]
        self.sample_rate, self.clip_samples = audio_cfg["sample_rate"], audio_cfg["clip_samples"]
        # Cnn6 takes a raw waveform tensor; Cnn10/Cnn14 and HTSAT take a dict with the waveform in it.
        self.raw_waveform = audio_cfg["model_type"] == "PANN" and audio_cfg["model_name"] == "Cnn6"
        self.text_model = text_model
        self.context_length = cfg["text_cfg"].get("context_length", 77)
        self.pad_id = hf_tokenizer(text_model).pad_token_id if text_model != "transformer" else None
        augmenter = getattr(self.clap.audio_branch, "spec_augmenter", None)
        if augmenter is not None and spec_time_drop:
            # laion_clap's SpecAugment drops up to 64 frames at a time, sized for 10-s clips; on short clips
            # that can erase a whole event, and with it the order we train on.
            augmenter.time_dropper.drop_width = spec_time_drop
        # CLAP pools its audio encoder over time (PANN: max + mean; HTSAT: averaged tokens), which discards the
        # order of events. Trained from scratch, audio and text then sit at a symmetric saddle: neither side can
        # tell "A then B" from "B then A", so neither gets a gradient to start. Order pooling adds a learned
        # projection of "late minus early" frame embeddings (`order_features`) to the pooled embedding, so the
        # reversed clip gets a different embedding from the first step. Pretrained CLAP checkpoints already carry
        # some order information and can leave it off.
        self.order_projection = nn.Linear(cfg["embed_dim"], cfg["embed_dim"]) if order_pooling else None
        # The MLP "transform" heads and the text logit scale serve laion's optional MLP loss, and PANN's AudioSet
        # classifier its pretraining, all unused here; frozen so that DDP does not wait for their gradients.
        for name in ("audio_transform", "text_transform", "logit_scale_t"):
            getattr(self.clap, name).requires_grad_(False)
        if hasattr(self.clap.audio_branch, "fc_audioset"):
            self.clap.audio_branch.fc_audioset.requires_grad_(False)
        if text_model == "bart":
            # laion_clap embeds a caption with BART's encoder output; the decoder runs but gets no gradient, except
            # its token embedding, which is the encoder's (tied)
            shared = self.clap.text_branch.get_input_embeddings().weight
            for p in self.clap.text_branch.decoder.parameters():
                if p is not shared:
                    p.requires_grad_(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return tokenize(texts, self.text_model, self.context_length)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        audio = waveform(audio)
        x = audio if self.raw_waveform else {"waveform": audio, "longer": torch.zeros(len(audio), dtype=torch.bool)}
        encoded = self.clap.encode_audio(x, device=audio.device)
        features = encoded["embedding"]
        if self.order_projection is not None:
            features = features + self.order_projection(order_features(encoded["fine_grained_embedding"], audio))
        return F.normalize(self.clap.audio_projection(features), dim=-1)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (see `tokenize`) -> unit vectors. The Hugging Face branches take their attention mask (and
        BERT its segment ids) beside the ids; the data path ships ids only, so they are made here. RoBERTa and BERT
        then read the first token, which the mask keeps from seeing the padding; laion_clap's BART averages every
        position's output, padding included, as LAION trained it."""
        text = tokens
        if self.text_model != "transformer":
            mask, segments = (tokens != self.pad_id).long(), torch.zeros_like(tokens)
            text = {"input_ids": tokens, "attention_mask": mask, "token_type_ids": segments}
        return F.normalize(self.clap.encode_text(text, device=tokens.device), dim=-1)

    def forward(self, audio: torch.Tensor | None, *token_batches: torch.Tensor):
        """(audio embeddings or None, one text embedding per token batch..., logit scale)."""
        a = self.embed_audio(audio) if audio is not None else None
        texts = [self.embed_text(t) for t in token_batches]
        return (a, *texts, self.clap.logit_scale_a.exp().clamp(max=100))
