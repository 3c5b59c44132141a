"""Orbax checkpoints of a model in our layout: `splitserve convert` writes them, load_model reads them.

A converted directory:

    splitserve_orbax.json  marker, written last: {"format", "version", "dtype", "name"}
    model_config.json      ModelConfig.to_json_dict(), checkpoint_dtype = the stored dtype
    params/                Orbax StandardCheckpointer tree: nnx.to_pure_dict of the Decoder's
                           params loaded at tp=1 (input-major, heads unflattened, the model's
                           own heads: the identity HeadLayout)
    tokenizer.json         copied from the source (when it has one), with tokenizer_config.json
                           special_tokens_map.json and chat_template.jinja (the chat template:
                           models/chat_template.py)

Loading onto a mesh:
  * head layout is the identity (tp divides the KV heads): every array is restored straight
    into its target NamedSharding, so each device reads only its own shard;
  * otherwise (replicated / zero-padded heads): arrays are restored to the host, their
    "heads" / "kv_heads" axes remapped with loader.select_heads, and placed like HF weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from splitserve.models.config import ModelConfig
from splitserve.models.head_layout import HeadLayout, head_layout_for
from splitserve.models.loader import (
    LoadedModel,
    abstract_model,
    load_model,
    place,
    resolve_dtype,
    select_heads,
)
from splitserve.models.metadata import (ORBAX_CONFIG, ORBAX_FORMAT, ORBAX_FORMAT_VERSION, ORBAX_MARKER,
                                       read_orbax_config, read_orbax_marker)
from splitserve.models.sharding import MeshConfig, make_mesh, named_sharding
from splitserve.models.chat_template import (ADDITIONAL_TEMPLATES, SPECIAL_TOKENS_MAP, TEMPLATE_FILE, TOKENIZER_CONFIG,
                                           ChatTemplate)
from splitserve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PARAMS_DIR = "params"


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def convert_to_orbax(model_path: str, out_dir: Path, *, dtype: str = "auto") -> Path:
    """Loads `model_path` (HF directory or "demo") at tp=1 and writes it to `out_dir` as Orbax.

    The directory is assembled next to `out_dir` and renamed into place, so a reader never
    sees a half-written checkpoint. `out_dir` must not exist (or be empty).
    """
    if model_path == "demo":
        from splitserve.models.demo import ensure_demo_model

        model_path = str(ensure_demo_model())
    source = Path(model_path)
    if (source / ORBAX_MARKER).exists():
        raise ValueError(f"{source} is already a splitserve Orbax checkpoint")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")

    loaded = load_model(str(source), make_mesh(MeshConfig(tp=1)), dtype=dtype)
    dtype_name = jnp.dtype(loaded.dtype).name
    config = dataclasses.replace(loaded.config, checkpoint_dtype=dtype_name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        # Uncompressed: weights barely compress (~7%) and zstd made restores ~2x slower.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(nnx.to_pure_dict(loaded.params)))
        (tmp / ORBAX_CONFIG).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
        for name in ("tokenizer.json", TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, TEMPLATE_FILE):  # tokenizer, chat template
            if (source / name).exists():
                shutil.copyfile(source / name, tmp / name)
        if (source / ADDITIONAL_TEMPLATES).is_dir():  # named templates ("tool_use") beside the chat template
            shutil.copytree(source / ADDITIONAL_TEMPLATES, tmp / ADDITIONAL_TEMPLATES)
        marker = {"format": ORBAX_FORMAT, "version": ORBAX_FORMAT_VERSION, "dtype": dtype_name, "name": loaded.name}
        (tmp / ORBAX_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def load_orbax_model(model_dir: Path, mesh: Mesh, *, dtype: str = "auto") -> LoadedModel:
    """Restores a converted checkpoint onto `mesh`; dtype "auto" is the dtype it was stored in."""
    model_dir = Path(model_dir).absolute()
    marker = read_orbax_marker(model_dir)
    config = read_orbax_config(model_dir)
    layout = head_layout_for(config.num_heads, config.num_kv_heads, mesh.shape["tp"])
    jdtype = resolve_dtype(dtype, config)
    graphdef, params = nnx.split(abstract_model(config, layout, jdtype))
    if layout.is_identity:
        _restore_sharded(model_dir / PARAMS_DIR, params, mesh, jdtype)
    else:
        log.warning("tp=%d: serving %d query / %d KV heads for the model's %d / %d (replicated or padded)",
                    mesh.shape["tp"], layout.num_heads, layout.num_kv_heads, config.num_heads,
                    config.num_kv_heads)
        _restore_remapped(model_dir / PARAMS_DIR, params, config, layout, mesh, jdtype)
    return LoadedModel(config, layout, graphdef, params, Tokenizer.maybe_load(model_dir), mesh,
                       jdtype, name=marker["name"] or model_dir.name, chat_template=ChatTemplate.maybe_load(model_dir))


@contextlib.contextmanager
def _damaged_files_named(path: Path):
    """TensorStore reports a truncated or missing data file as a bare Exception: a ValueError naming the checkpoint."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - tensorstore's and orbax's own errors
        why = str(e).splitlines()[0].split(" See full TensorStore details")[0][:300]
        raise ValueError(f"{path}: the Orbax checkpoint does not restore ({why})") from None


def _restore_sharded(path: Path, params: nnx.State, mesh: Mesh, dtype) -> None:
    """Fills abstract `params` in place, each array restored directly into its sharding."""

    def target(var: nnx.Variable) -> jax.ShapeDtypeStruct:
        shape = var.get_value().shape
        sharding = named_sharding(var.get_metadata()["logical_axes"], shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    targets = nnx.to_pure_dict(jax.tree.map(target, params, is_leaf=_is_var))
    with ocp.StandardCheckpointer() as checkpointer, _damaged_files_named(path):
        restored = checkpointer.restore(path, targets)
    nnx.replace_by_pure_dict(params, restored)


def _restore_remapped(path: Path, params: nnx.State, config: ModelConfig, layout: HeadLayout,
                      mesh: Mesh, dtype) -> None:
    """Restores the identity-layout tree to host, remaps head axes to `layout`, places it."""
    stored = nnx.split(abstract_model(config, head_layout_for(config.num_heads, config.num_kv_heads, 1),
                                      dtype))[1]
    restore_args = _str_keys(nnx.to_pure_dict(
        jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored, is_leaf=_is_var)))
    with ocp.PyTreeCheckpointer() as checkpointer, _damaged_files_named(path):  # layer indices as str keys
        host = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    for keys, var in nnx.to_flat_state(params):
        array = host
        for key in keys:
            array = array[str(key)]
        for axis, name in enumerate(var.get_metadata()["logical_axes"]):
            if name == "heads":
                array = select_heads(array, layout.q_source, axis)
            elif name == "kv_heads":
                array = select_heads(array, layout.kv_source, axis)
        place(var, array, mesh, dtype)


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
