"""Which row of the device's per-request vocabulary arrays each decoding request uses (no JAX).

presence_penalty and frequency_penalty need, per request, how often each vocabulary id has been
generated so far; repetition_penalty also which ids are in the prompt; logit_bias and
allowed_token_ids a bias per id; structured outputs a token mask per step. Those live on the
device ([rows, vocab] int32 counts, updated inside the decode step, [rows, vocab] f32 biases and
[rows, vocab / 32] i32 masks; runtime/sampling.py), one row of each per request that asks for any
of them; this module hands the rows out. A decode
step lists every running request (DecodeEngine and ColocatedEngine both do), so a request that
no longer appears has finished or been released, and its row is free for the next one. A
request at its first decode step (step 1: only the prefill's token is out) gets a fresh row even
if its id still holds one: an id reused before any step went without it must not inherit counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.runtime.sampling_params import SamplingParams


class PenaltyRows:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._rows: dict[str, int] = {}  # request id -> its row
        self._free = list(range(capacity - 1, -1, -1))

    def rows_for(self, request_ids: Sequence[str] | None, params: Sequence[SamplingParams], steps: Sequence[int]
                 ) -> tuple[list[int] | None, list[int]]:
        """(each request's row, or None for all when no request of the step has a penalty;
        the positions in the step of the requests whose rows are fresh: the caller zeroes those rows,
        or sets their prompt flags, before the step uses them)."""
        wanted = [p.penalised or p.biased or p.structured_outputs is not None for p in params]
        if request_ids is None:
            if any(wanted):
                raise ValueError("penalties and logit biases need the request ids of the decode step")
            return None, []
        present = set(request_ids)
        for request_id in [r for r in self._rows if r not in present]:  # finished since the last step
            self._free.append(self._rows.pop(request_id))
        if not any(wanted):
            return None, []
        fresh = []
        for position, (request_id, wants, step) in enumerate(zip(request_ids, wanted, steps)):
            if wants and step <= 1 and request_id in self._rows:  # a new request under a reused id
                fresh.append(position)
            elif wants and request_id not in self._rows:
                if not self._free:
                    raise ValueError(f"more than {self.capacity} requests with penalties or biases in one decode step")
                self._rows[request_id] = self._free.pop()
                fresh.append(position)
        return [self._rows[r] if wants else self.capacity for r, wants in zip(request_ids, wanted)], fresh
