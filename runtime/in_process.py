"""Helpers for running a model in this process: load onto a mesh, stream one request."""

from __future__ import annotations

from typing import Iterator

from splitserve.models.loader import LoadedModel, load_model
from splitserve.models.sharding import MeshConfig, make_mesh
from splitserve.runtime.colocated_engine import ColocatedEngine
from splitserve.runtime.request import Completion
from splitserve.runtime.sampling_params import SamplingParams


def load_for_serving(model_path: str, mesh_config: MeshConfig, dtype: str = "auto") -> LoadedModel:
    return load_model(model_path, make_mesh(mesh_config), dtype=dtype)


def generate_stream(engine: ColocatedEngine, prompt_ids: list[int],
                    params: SamplingParams) -> Iterator[tuple[str, Completion | None]]:
    """Yields (text delta, None) per token, then ("", Completion) once finished; raises ValueError
    if the request stopped unfinished (its structured output failed)."""
    request_id = engine.add_request(prompt_ids, params)
    try:
        while not engine.is_finished(request_id):
            for event in engine.step():
                if event.request_id == request_id and event.error:
                    raise ValueError(event.error)
                if event.request_id == request_id and event.text_delta:
                    yield event.text_delta, None
    finally:
        completion = engine.release(request_id)  # aborts it if the caller stopped early
    yield "", completion
