"""The public gRPC Serving service (splitserve.v1), backed by a Router.

Generate admits the call first (runtime/admission.py: RESOURCE_EXHAUSTED at once past the
limit), then hands the router the call's deadline and cancellation (runtime/deadlines.py).
Requests are parsed in the handler (add_serving_service), so a malformed message is answered
INVALID_ARGUMENT like any other bad input.
"""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from splitserve.models.chat_template import ChatTemplateError
from splitserve.protos import serving_pb2, serving_pb2_grpc
from splitserve.runtime.admission import AdmissionGate, AdmissionRejected
from splitserve.runtime.deadlines import CallCancelled, CallScope, DeadlinePassed
from splitserve.runtime.drain import Admission, NotAdmitted
from splitserve.runtime.metrics import RouterMetrics
from splitserve.runtime.parallel_sampling import sequences
from splitserve.runtime.proto_convert import chat_from_proto, sampling_from_public
from splitserve.runtime.router import Router, RouterError
from splitserve.runtime.sampling_params import MAX_N

log = logging.getLogger(__name__)
# A client's optional request id. The router adds a 13-character suffix, and the id travels with
# each of the request's tokens between workers and router.
MAX_CLIENT_REQUEST_ID_BYTES = 256


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, router: Router, *, lifecycle: Admission, admission: AdmissionGate | None = None,
                 metrics: RouterMetrics | None = None):
        """`lifecycle`: starting/serving/draining, counts streams in flight so a drain can wait for
        them; `admission`: the limit on concurrent calls (RESOURCE_EXHAUSTED past it)."""
        self.router = router
        self.lifecycle = lifecycle
        self.admission = admission or AdmissionGate()
        self.metrics = metrics or RouterMetrics()

    def _prompt_ids(self, request, context) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        tokenizer = self.router.metadata.tokenizer
        if kind not in ("text", "messages"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is missing: set text, token_ids or messages")
        if tokenizer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no tokenizer: send token_ids")
        if kind == "text":
            return tokenizer.encode(request.text)
        template = self.router.metadata.chat_template
        if template is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this model has no chat template (chat_template.jinja "
                          "or tokenizer_config.json's chat_template): send the prompt as text")
        try:
            messages, tools = chat_from_proto(request.messages)
            text = template.render(messages, tools=tools)
        except ChatTemplateError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return tokenizer.encode(text, add_special_tokens=False)  # the template wrote its special tokens

    def Generate(self, request, context):
        timer = self.metrics.start_request()
        # The end of the call, however it ends (finished, aborted, cancelled), closes the timer once.
        context.add_callback(lambda: timer.close(error_code=_status_name(context)))
        try:
            self.lifecycle.enter()
        except NotAdmitted as e:
            timer.close(error_code=grpc.StatusCode.UNAVAILABLE.name)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        try:
            places = _sequences_asked(request)
            if places > self.admission.limit:  # could never be admitted: not "busy", which would be retried
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"n={places} sequences exceed this router's limit of "
                              f"{self.admission.limit} concurrent requests (--max-concurrent-requests)")
            with self.admission.admit(places):
                yield from self._generate(request, context, timer)
        except AdmissionRejected as e:
            timer.close(error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.name)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Exception:
            timer.close(error_code=_status_name(context) or "UNKNOWN")
            raise
        finally:
            self.lifecycle.leave()

    def _generate(self, request, context, timer):
        if len(request.request_id.encode()) > MAX_CLIENT_REQUEST_ID_BYTES:  # it travels with every token of the request
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id is {len(request.request_id.encode())} "
                          f"bytes of UTF-8; at most {MAX_CLIENT_REQUEST_ID_BYTES} are allowed")
        try:
            params = sampling_from_public(request.sampling)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        prompt_ids = params.truncated(self._prompt_ids(request, context), self.router.metadata.config.max_model_len)
        first, unfinished = True, params.n
        try:
            for index, event in sequences(self.router, prompt_ids, params, request.request_id,
                                          CallScope.from_context(context),
                                          on_prefill=lambda: timer.prefill_sent(len(prompt_ids))):
                timer.tokens(len(event.token_ids), index)
                yield _response(event, prompt_ids if first else [], request.request_id, index)
                first = False
                unfinished -= bool(event.finish_reason)
                if not unfinished:  # the request's last sequence ended
                    timer.close(finish_reason=event.finish_reason)
        except RouterError as e:
            context.abort(e.code, str(e))
        except DeadlinePassed as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except CallCancelled:
            return  # nobody is listening; the router has released what the request held

    def ModelInfo(self, request, context):
        cfg = self.router.metadata.config
        self.router.refresh_stats()
        page_size, dtype = self.router.serves_with()  # the workers' own, whatever the router was told
        workers = [serving_pb2.WorkerInfo(role=w.role, address=w.address, mesh=w.mesh, platform=w.platform)
                   for w in self.router.workers]
        return serving_pb2.ModelInfoResponse(
            name=self.router.metadata.name, family=cfg.family, vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_model_len, dtype=dtype, page_size=page_size,
            eos_token_ids=list(cfg.eos_token_ids), workers=workers, mode=self.router.mode,
            chat_template=self.router.metadata.chat_template is not None)


def _sequences_asked(request) -> int:
    """Places the call takes of the admission limit: one per sequence (n), checked later."""
    n = request.sampling.n if request.sampling.HasField("n") else 1
    return n if 1 <= n <= MAX_N else 1  # a bad n is refused with INVALID_ARGUMENT once admitted


def _response(event, prompt_ids: list[int], request_id: str, index: int) -> serving_pb2.GenerateResponse:
    msg = serving_pb2.GenerateResponse(token_ids=event.token_ids, text=event.text, finish_reason=event.finish_reason,
                                       prompt_token_ids=prompt_ids, request_id=request_id, index=index,
                                       logprobs=[lp.to_proto(serving_pb2.TokenLogprobs) for lp in event.logprobs],
                                       prompt_logprobs=[lp.to_proto(serving_pb2.TokenLogprobs)
                                                        for lp in event.prompt_logprobs],
                                       cached_prompt_tokens=event.cached_prompt_tokens)
    if isinstance(event.stop_reason, str):
        msg.stop_string = event.stop_reason
    elif event.stop_reason is not None:
        msg.stop_token_id = event.stop_reason
    return msg


def _status_name(context) -> str:
    """The status the call ended with, if it was not OK ("" while running or when OK)."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return "" if context.is_active() else "CANCELLED"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


def add_serving_service(server: grpc.Server, servicer: ServingService) -> None:
    """Registers Serving like the generated `add_ServingServicer_to_server`, except that each request
    is parsed in the handler: gRPC's own deserializer answers a malformed message (bad wire format,
    invalid UTF-8 in a string field) with INTERNAL, which would blame the server for a client's
    mistake."""
    pb = serving_pb2
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            _parsed(servicer.Generate, pb.GenerateRequest), None, pb.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            _parsed(servicer.ModelInfo, pb.ModelInfoRequest), None, pb.ModelInfoResponse.SerializeToString),
    }
    if set(handlers) != {m.name for m in _SERVING_SERVICE.methods}:
        raise RuntimeError("add_serving_service is out of date with protos/serving.proto")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVING_SERVICE.full_name, handlers),))


def _parsed(method: Callable, message_type) -> Callable:
    def handler(raw: bytes, context):
        try:
            request = message_type.FromString(raw)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is not a valid {message_type.DESCRIPTOR.full_name} message: {e}")
        return method(request, context)

    return handler


_SERVING_SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Serving"]
