"""Typed model configuration for the Llama family, read from an HF config.json.

One `ModelConfig` covers Llama 2/3/3.1+, Mistral, Qwen2 and Qwen3: the families differ
only by flags (qkv bias, q/k norm, rope scaling, tied embeddings).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias also sets it
    o_bias: bool = False  # Llama's attention_bias=True biases o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    checkpoint_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older files have `rope_theta` + `rope_scaling`. A
    # file with both is read as transformers reads it: the legacy rope_scaling over rope_parameters.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    params.update(scaling)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _as_id_tuple(value, name: str = "eos_token_id") -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a token id or a list of them, got {json.dumps(value)[:80]}")
    return tuple(value)


SERVING_DTYPES = ("float32", "bfloat16")  # what the attention kernels take


def serving_dtype_name(dtype: str, config: ModelConfig) -> str:
    """The dtype the weights are served in: `dtype` (--dtype), or under "auto" the checkpoint's,
    with float16 served as bfloat16. bfloat16 keeps float16's range, and is what JAX serving
    stacks use on TPUs; the kernels take no float16."""
    if dtype != "auto":
        if dtype not in SERVING_DTYPES:
            hint = " (a float16 checkpoint is served in bfloat16 under auto)" if dtype == "float16" else ""
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(SERVING_DTYPES)}{hint}")
        return dtype
    stored = config.checkpoint_dtype
    if stored == "float16":
        return "bfloat16"
    if stored not in SERVING_DTYPES:
        raise ValueError(f"the checkpoint is stored as {stored!r}, which has no serving dtype under --dtype auto; "
                         f"pass --dtype float32 or bfloat16")
    return stored


def _check_supported(hf: dict[str, Any]) -> None:
    """Fields transformers honours that this decoder does not implement: refused, not ignored."""
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) \
            else "?"
        raise ValueError(f"quantized checkpoints are not supported (quantization_config: {method}); "
                         "load the float32, bfloat16 or float16 weights")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported: the MLP is SwiGLU (silu)")


def _flag(hf: dict[str, Any], key: str, default: bool = False) -> bool:
    """A true/false field of config.json (null or absent: the default). A string "false" is refused,
    not read as true: the model would be built wrong without a word."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def config_from_hf(hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Builds a ModelConfig from the dicts of config.json (and generation_config.json)."""
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None and not archs:  # model_type alone only when no architecture is named: a
        # LlamaForSequenceClassification is model_type "llama" too, but has no language-model head
        family = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
            hf.get("model_type", "")
        )
    if family is None:
        raise ValueError(
            f"unsupported model: architectures={archs}, model_type={hf.get('model_type')!r}; "
            f"supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    _check_supported(hf)
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    max_len = int(hf.get("max_position_embeddings", 4096))
    sliding = hf.get("sliding_window")
    use_sliding = _flag(hf, "use_sliding_window", family == "mistral")
    if sliding and use_sliding and sliding < max_len:
        # No sliding-window attention yet: serve only lengths where it equals full attention.
        max_len = int(sliding)
    attention_bias = _flag(hf, "attention_bias")
    eos = _as_id_tuple((generation_config or {}).get("eos_token_id")) or _as_id_tuple(hf.get("eos_token_id"))
    outside = [t for t in eos if not 0 <= t < int(hf["vocab_size"])]
    if outside:
        raise ValueError(f"eos_token_id {outside} is outside the vocabulary (vocab_size {hf['vocab_size']})")
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_model_len=max_len,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf),
        tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
        # As transformers builds them: Qwen2 always has q/k/v biases and never an o_proj one,
        # Mistral has none, Llama and Qwen3 have all four when attention_bias is set.
        qkv_bias=family == "qwen2" or (attention_bias and family in ("llama", "qwen3")),
        o_bias=attention_bias and family in ("llama", "qwen3"),
        mlp_bias=_flag(hf, "mlp_bias"),
        qk_norm=family == "qwen3",
        checkpoint_dtype=str(dtype).replace("torch.", ""),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def load_hf_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it an HF model directory?")
    hf = read_json_object(config_path)
    gen_path = model_dir / "generation_config.json"
    gen = read_json_object(gen_path) if gen_path.exists() else None
    try:
        return config_from_hf(hf, gen)
    except KeyError as e:
        raise ValueError(f"{config_path} has no {e} field") from None
    except (TypeError, AttributeError, ZeroDivisionError) as e:  # a field of the wrong type, or 0 heads
        raise ValueError(f"{config_path}: a field has the wrong type or value ({e})") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """A model directory's JSON file that must hold an object; ValueError naming the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # not UTF-8
        raise ValueError(f"{path}: not JSON ({e})") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value
