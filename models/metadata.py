"""A model's config, tokenizer and chat template without its weights (and without JAX): what a router needs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from splitserve.models.config import ModelConfig, load_hf_config, read_json_object
from splitserve.models.chat_template import ChatTemplate
from splitserve.models.tokenizer import Tokenizer

# A `splitserve convert` checkpoint (models/orbax_checkpoint.py): read here too, without JAX, by the router.
ORBAX_MARKER = "splitserve_orbax.json"
ORBAX_CONFIG = "model_config.json"
ORBAX_FORMAT, ORBAX_FORMAT_VERSION = "splitserve-orbax", 1


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


def read_orbax_marker(model_dir: Path) -> dict:
    """A converted checkpoint's marker; ValueError naming the file if it is not one this splitserve reads."""
    path = Path(model_dir) / ORBAX_MARKER
    marker = read_json_object(path)
    version = marker.get("version")
    if marker.get("format") != ORBAX_FORMAT or type(version) is not int or version != ORBAX_FORMAT_VERSION:
        raise ValueError(f"{model_dir}: Orbax checkpoint format {marker.get('format')!r} version "
                         f"{marker.get('version')!r}; this splitserve reads {ORBAX_FORMAT!r} version "
                         f"{ORBAX_FORMAT_VERSION}")
    if not isinstance(marker.get("name"), str):
        raise ValueError(f"{path}: \"name\" must be the model's name (a string), got {marker.get('name')!r}")
    return marker


def read_orbax_config(model_dir: Path) -> ModelConfig:
    """The ModelConfig that convert wrote; ValueError naming the file and the field otherwise."""
    path = Path(model_dir) / ORBAX_CONFIG
    try:
        return ModelConfig.from_json_dict(read_json_object(path))
    except KeyError as e:
        raise ValueError(f"{path}: missing {e.args[0]!r} (was it written by `splitserve convert`?)") from None
    except TypeError as e:  # an unknown or malformed field
        raise ValueError(f"{path}: {e}") from None


def load_metadata(path: str) -> ModelMetadata:
    model_dir = resolve_model_dir(path)
    if (model_dir / ORBAX_MARKER).exists():
        name = read_orbax_marker(model_dir)["name"] or model_dir.name
        config = read_orbax_config(model_dir)
    else:
        config = load_hf_config(model_dir)
        name = json.loads((model_dir / "config.json").read_text()).get("_name_or_path") or model_dir.name
    return ModelMetadata(name=name, config=config, tokenizer=Tokenizer.maybe_load(model_dir),
                         chat_template=ChatTemplate.maybe_load(model_dir))
