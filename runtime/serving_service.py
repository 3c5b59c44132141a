"""The public gRPC Serving service (splitserve.v1), backed by a Router."""

from __future__ import annotations

import logging

import grpc

from splitserve.protos import serving_pb2, serving_pb2_grpc
from splitserve.runtime.drain import Admission, NotAdmitted
from splitserve.runtime.proto_convert import sampling_from_public
from splitserve.runtime.router import Router, RouterError

log = logging.getLogger(__name__)


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, router: Router, *, admission: Admission, dtype: str, page_size: int):
        self.router = router
        self.admission = admission  # counts streams in flight, so a drain can wait for them
        self.dtype, self.page_size = dtype, page_size

    def _prompt_ids(self, request, context) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            tokenizer = self.router.metadata.tokenizer
            if tokenizer is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer: send token_ids")
            return tokenizer.encode(request.text)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text or token_ids")

    def Generate(self, request, context):
        try:
            self.admission.enter()
        except NotAdmitted as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            yield from self._generate(request, context)
        finally:
            self.admission.leave()

    def _generate(self, request, context):
        prompt_ids = self._prompt_ids(request, context)
        try:
            params = sampling_from_public(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = True
        try:
            for event in self.router.generate(prompt_ids, params, request.request_id):
                yield serving_pb2.GenerateResponse(
                    token_ids=event.token_ids, text=event.text, finish_reason=event.finish_reason,
                    prompt_token_ids=prompt_ids if first else [], request_id=request.request_id)
                first = False
        except RouterError as e:
            context.abort(e.code, str(e))

    def ModelInfo(self, request, context):
        cfg = self.router.metadata.config
        self.router.refresh_stats()
        workers = [serving_pb2.WorkerInfo(role=w.role, address=w.address, mesh=w.mesh, platform=w.platform)
                   for w in self.router.workers]
        return serving_pb2.ModelInfoResponse(
            name=self.router.metadata.name, family=cfg.family, vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_model_len, dtype=self.dtype, page_size=self.page_size,
            eos_token_ids=list(cfg.eos_token_ids), workers=workers, mode=self.router.mode)
