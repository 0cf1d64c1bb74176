"""Request-scoped dependencies, as `Annotated` aliases that tests can override."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.settings import Settings, get_settings
from service.state import ServingState

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def get_ready_state(request: Request) -> ServingState:
    state: ServingState = request.app.state.serving
    if not state.ready:
        raise NotReady(f"The model is not ready: {state.not_ready_reason}", headers={"Retry-After": "5"})
    return state


StateDep = Annotated[ServingState, Depends(get_state)]
ReadyStateDep = Annotated[ServingState, Depends(get_ready_state)]
