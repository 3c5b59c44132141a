"""Loads a model (HF directory, Orbax checkpoint, or `demo`) into a mesh's sharding.

Each tensor is read on the host once, converted to our layout (input-major, heads
unflattened, heads padded/replicated per HeadLayout), and placed with
`jax.make_array_from_callback`, so each device receives only its own shard and at most
one tensor is held on the host at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from splitserve.models.config import ModelConfig, load_hf_config, serving_dtype_name
from splitserve.models.decoder import Decoder
from splitserve.models.head_layout import HeadLayout, head_layout_for
from splitserve.models.metadata import ORBAX_MARKER, resolve_model_dir
from splitserve.models.safetensors_reader import SafetensorsReader
from splitserve.models.sharding import named_sharding
from splitserve.models.chat_template import ChatTemplate
from splitserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)



@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    layout: HeadLayout
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer | None
    mesh: Mesh
    dtype: jnp.dtype
    name: str
    chat_template: ChatTemplate | None = None


def resolve_dtype(dtype: str, config: ModelConfig):
    name = serving_dtype_name(dtype, config)
    if name != config.checkpoint_dtype and dtype == "auto":
        log.warning("the checkpoint is stored as %s; serving it in %s", config.checkpoint_dtype, name)
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def abstract_model(config: ModelConfig, layout: HeadLayout, dtype) -> Decoder:
    return nnx.eval_shape(lambda: Decoder(config, layout, dtype, rngs=nnx.Rngs(0)))


def place(var: nnx.Variable, host: np.ndarray, mesh: Mesh, dtype) -> None:
    """Puts one host tensor into `var`, sharded by its logical axes over `mesh`."""
    expected = var.get_value().shape
    if host.shape != tuple(expected):
        raise ValueError(f"tensor for {var.get_metadata()['logical_axes']} has shape {host.shape}, "
                         f"expected {tuple(expected)}")
    host = np.asarray(host).astype(dtype, copy=False)  # a view when the dtype already matches
    sharding = named_sharding(var.get_metadata()["logical_axes"], host.shape, mesh)
    var.set_value(jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx]))


def select_heads(w: np.ndarray, source: tuple[int, ...], axis: int) -> np.ndarray:
    """Selects heads along `axis` by `source`; -1 gives a zero head."""
    if source == tuple(range(w.shape[axis])):
        return w  # identity layout: no copy
    picked = np.take(w, np.maximum(np.array(source), 0), axis=axis)
    pad = np.array(source) < 0
    if pad.any():
        shape = [1] * picked.ndim
        shape[axis] = len(source)
        picked = np.where(pad.reshape(shape), np.zeros((), picked.dtype), picked)
    return picked


def _load_hf_weights(model: Decoder, reader: SafetensorsReader, cfg: ModelConfig,
                     layout: HeadLayout, mesh: Mesh, dtype) -> None:
    d, hd = cfg.hidden_size, cfg.head_dim

    def put(var, host):
        place(var, host, mesh, dtype)

    def proj_in(name, heads, source):  # HF [heads*hd, d] -> [d, heads', hd]
        return select_heads(_shaped(reader.get(name), name, (heads * hd, d)).T.reshape(d, heads, hd), source, axis=1)

    def bias_in(name, heads, source):  # HF [heads*hd] -> [heads', hd]
        return select_heads(_shaped(reader.get(name), name, (heads * hd,)).reshape(heads, hd), source, axis=0)

    put(model.embed, reader.get("model.embed_tokens.weight"))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = layer.attn
        put(layer.input_norm.weight, reader.get(p + "input_layernorm.weight"))
        put(layer.post_attn_norm.weight, reader.get(p + "post_attention_layernorm.weight"))
        put(attn.q_proj, proj_in(p + "self_attn.q_proj.weight", cfg.num_heads, layout.q_source))
        put(attn.k_proj, proj_in(p + "self_attn.k_proj.weight", cfg.num_kv_heads, layout.kv_source))
        put(attn.v_proj, proj_in(p + "self_attn.v_proj.weight", cfg.num_kv_heads, layout.kv_source))
        o = _shaped(reader.get(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj.weight",
                    (d, cfg.num_heads * hd)).T.reshape(cfg.num_heads, hd, d)
        put(attn.o_proj, select_heads(o, layout.q_source, axis=0))
        if cfg.qkv_bias:
            put(attn.q_bias, bias_in(p + "self_attn.q_proj.bias", cfg.num_heads, layout.q_source))
            put(attn.k_bias, bias_in(p + "self_attn.k_proj.bias", cfg.num_kv_heads, layout.kv_source))
            put(attn.v_bias, bias_in(p + "self_attn.v_proj.bias", cfg.num_kv_heads, layout.kv_source))
        if cfg.o_bias:
            put(attn.o_bias, reader.get(p + "self_attn.o_proj.bias"))
        if cfg.qk_norm:
            put(attn.q_norm.weight, reader.get(p + "self_attn.q_norm.weight"))
            put(attn.k_norm.weight, reader.get(p + "self_attn.k_norm.weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(layer.mlp, proj), reader.get(f"{p}mlp.{proj}.weight").T)
        if cfg.mlp_bias:
            for proj, attr in (("gate_proj", "gate_bias"), ("up_proj", "up_bias"), ("down_proj", "down_bias")):
                put(getattr(layer.mlp, attr), reader.get(f"{p}mlp.{proj}.bias"))
    put(model.final_norm.weight, reader.get("model.norm.weight"))
    unused = sorted(n for n in reader.names() if n.startswith("model.layers.")
                    and int(n.split(".")[2]) >= cfg.num_layers)
    if unused:  # a config that names fewer layers than the weights hold: serving them would cut the model
        raise ValueError(f"the checkpoint holds layers past config.json's num_hidden_layers={cfg.num_layers} "
                         f"({unused[0]}, {len(unused)} tensors in all); set num_hidden_layers to match the weights")
    if not cfg.tie_word_embeddings:
        put(model.lm_head, reader.get("lm_head.weight").T)
    elif "lm_head.weight" in reader and not np.array_equal(reader.get("lm_head.weight"),
                                                           reader.get("model.embed_tokens.weight")):
        # transformers 5 serves such a file's lm_head, 4.x its embeddings: which was meant is unknown.
        raise ValueError("config.json ties the output layer to the embeddings (tie_word_embeddings), but the "
                         "checkpoint holds an lm_head.weight that differs from them; set tie_word_embeddings "
                         "to match the weights")


def _shaped(tensor: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if tensor.shape != shape:
        raise ValueError(f"tensor {name!r} has shape {tensor.shape}, but config.json implies {shape} "
                         "(heads x head_dim, hidden_size)")
    return tensor


def load_model(path: str, mesh: Mesh, *, dtype: str = "auto") -> LoadedModel:
    """Loads `demo`, an HF directory, or a `splitserve convert` Orbax checkpoint onto `mesh`."""
    model_dir = resolve_model_dir(path)
    if (model_dir / ORBAX_MARKER).exists():
        from splitserve.models.orbax_checkpoint import load_orbax_model

        return load_orbax_model(model_dir, mesh, dtype=dtype)

    config = load_hf_config(model_dir)
    tp = mesh.shape["tp"]
    layout = head_layout_for(config.num_heads, config.num_kv_heads, tp)
    if not layout.is_identity:
        log.warning("tp=%d: serving %d query / %d KV heads for the model's %d / %d (replicated or padded)",
                    tp, layout.num_heads, layout.num_kv_heads, config.num_heads, config.num_kv_heads)
    jdtype = resolve_dtype(dtype, config)
    model = abstract_model(config, layout, jdtype)
    _load_hf_weights(model, SafetensorsReader(model_dir), config, layout, mesh, jdtype)
    graphdef, params = nnx.split(model)
    return LoadedModel(config, layout, graphdef, params, Tokenizer.maybe_load(model_dir), mesh,
                       jdtype, name=_model_name(model_dir), chat_template=ChatTemplate.maybe_load(model_dir))


def _model_name(model_dir: Path) -> str:
    meta = model_dir / "config.json"
    name = json.loads(meta.read_text()).get("_name_or_path") if meta.exists() else None
    return name or model_dir.name
