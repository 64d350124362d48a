"""POST /v1/requests/{id}/preference: change the preference of a running request.

The new preference is validated as every route's (server.translate.preference_of) and left
on the request's handles, one per choice; the engine applies it at its next step
(guidance.steering), so it shapes the request's next token on, and the KV already computed
stays. The HTTP layer only hands it over: the model runs on the engine thread alone.

Only the caller that started a request reaches it: with API keys, the request must come
with the same key; another key's request is answered 404 like an id that never existed,
so ids of other callers cannot be probed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from guidance.steering import change_refused
from server.errors import quote
from server.openapi import api_responses
from server.request_ids import caller
from server.schemas import ApiError, Preference
from server.translate import preference_of

if TYPE_CHECKING:
    from server.relay import Gateway

PATH = "/v1/requests/{request_id}/preference"


class PreferenceChange(BaseModel):
    """The body: a new preference, nothing else (mode, gamma and merge method stay)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
    preference: Preference
    """mu: weights in objective order, or {objective: weight} (missing names weigh 0);
    finite, >= 0, not all zero; normalised onto the simplex."""


class PreferenceChanged(BaseModel):
    """The answer: the change is queued for the engine's next step."""

    model_config = ConfigDict(use_attribute_docstrings=True)
    id: str
    """The request's id (its X-Request-Id)."""
    object: str = "request.preference"
    """Always request.preference."""
    preference: list[float]
    """The new mu, normalised onto the simplex, in objective order."""
    requests: int
    """Running engine requests it goes to: the choices not finished yet."""


def register(app: FastAPI, gateway: Gateway) -> None:
    @app.post(
        PATH,
        status_code=202,
        response_model=None,
        responses=_responses(),
        summary="Change the preference of a running request from its next token on",
    )
    async def change_preference(
        body: PreferenceChange,
        http: Request,
        request_id: str = Path(description="The request's X-Request-Id (OpenAI's `id`)."),
    ) -> JSONResponse:
        store, _ = gateway.ready()
        mu = preference_of(body.preference, store.objectives)
        keyed = bool(gateway.settings.api_key)
        handles = gateway.live.running(caller(http, keyed), request_id)
        if not handles:
            message = (
                f"no running request has id {quote(request_id)}: it finished, never existed, "
                "or was started with another API key"
            )
            raise ApiError(404, message, "not_found", None, "request_id")
        reasons = (change_refused(store, handle.request) for handle in handles)
        if (reason := next((r for r in reasons if r is not None), None)) is not None:
            message = f"this request's preference cannot change while it runs: {reason}"
            raise ApiError(409, message, "conflict", None, "preference")
        for handle in handles:
            handle.change_preference(mu)
        answer = PreferenceChanged(
            id=request_id, preference=[float(w) for w in mu], requests=len(handles)
        )
        return JSONResponse(answer.model_dump(), status_code=202)


def _responses() -> dict:
    responses = api_responses(("openai-json", PreferenceChanged), 404, 409, 413, 422, 503)
    accepted = responses.pop(200)
    accepted["description"] = "Accepted: the engine applies it before the request's next token."
    return {202: accepted, **responses}
