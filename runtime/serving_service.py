"""The public gRPC Serving service (splitserve.v1), backed by a Router."""

from __future__ import annotations

import logging

import grpc

from splitserve.protos import serving_pb2, serving_pb2_grpc
from splitserve.runtime.metrics import RouterMetrics
from splitserve.runtime.proto_convert import sampling_from_public
from splitserve.runtime.router import Router, RouterError

log = logging.getLogger(__name__)


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, router: Router, *, dtype: str, page_size: int, metrics: RouterMetrics | None = None):
        self.router = router
        self.dtype, self.page_size = dtype, page_size
        self.metrics = metrics or RouterMetrics()

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
        timer = self.metrics.start_request()
        # The end of the call, however it ends (finished, aborted, cancelled), closes the timer once.
        context.add_callback(lambda: timer.close(error_code=_status_name(context)))
        try:
            yield from self._generate(request, context, timer)
        except Exception:
            timer.close(error_code=_status_name(context) or "UNKNOWN")
            raise

    def _generate(self, request, context, timer):
        prompt_ids = self._prompt_ids(request, context)
        try:
            params = sampling_from_public(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        first = True
        try:
            for event in self.router.generate(prompt_ids, params, request.request_id,
                                              on_prefill=lambda: timer.prefill_sent(len(prompt_ids))):
                timer.tokens(len(event.token_ids))
                yield serving_pb2.GenerateResponse(
                    token_ids=event.token_ids, text=event.text, finish_reason=event.finish_reason,
                    prompt_token_ids=prompt_ids if first else [], request_id=request.request_id)
                first = False
                if event.finish_reason:
                    timer.close(finish_reason=event.finish_reason)
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


def _status_name(context) -> str:
    """The status the call ended with, if it was not OK ("" while running or when OK)."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return "" if context.is_active() else "CANCELLED"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)
