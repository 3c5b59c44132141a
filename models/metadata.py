"""A model's config, tokenizer and chat template without its weights (and without JAX): what a router needs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from splitserve.models.config import ModelConfig, load_hf_config
from splitserve.models.chat_template import ChatTemplate
from splitserve.models.tokenizer import Tokenizer

ORBAX_MARKER = "splitserve_orbax.json"  # written by models/orbax_checkpoint.py
ORBAX_CONFIG = "model_config.json"


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    name: str
    config: ModelConfig
    tokenizer: Tokenizer | None
    chat_template: ChatTemplate | None = None


def resolve_model_dir(path: str) -> Path:
    if path == "demo":
        from splitserve.models.demo import ensure_demo_model

        return Path(ensure_demo_model())
    if not str(path).strip():  # Path("") is "." (the current directory), which would be read instead
        raise FileNotFoundError("the model path is empty: give a checkpoint directory (HF or Orbax) or 'demo'")
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a directory (nor 'demo')")
    return model_dir


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a model directory (HF or Orbax) or 'demo', for a --tokenizer flag; ValueError
    naming the problem when there is none or it does not load."""
    try:
        model_dir = resolve_model_dir(path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tokenizer = Tokenizer.maybe_load(model_dir)  # ValueError naming the file when it does not load
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.json there")
    return tokenizer


def load_metadata(path: str) -> ModelMetadata:
    model_dir = resolve_model_dir(path)
    if (model_dir / ORBAX_MARKER).exists():
        marker = json.loads((model_dir / ORBAX_MARKER).read_text())
        config = ModelConfig.from_json_dict(json.loads((model_dir / ORBAX_CONFIG).read_text()))
        name = marker.get("name") or model_dir.name
    else:
        config = load_hf_config(model_dir)
        name = json.loads((model_dir / "config.json").read_text()).get("_name_or_path") or model_dir.name
    return ModelMetadata(name=name, config=config, tokenizer=Tokenizer.maybe_load(model_dir),
                         chat_template=ChatTemplate.maybe_load(model_dir))
