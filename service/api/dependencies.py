"""Request-scoped dependencies, as `Annotated` aliases that tests can override.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
for what is an attribute read. Settings come from the app (create_app puts them there) rather than
through `app.dependency_overrides`, which makes FastAPI re-inspect the override's signature on every
request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.inference.state import ServingState
from service.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_state(request: Request) -> ServingState:
    return request.app.state.serving


async def get_ready_state(request: Request) -> ServingState:
    state: ServingState = request.app.state.serving
    if not state.ready:
        raise NotReady(f"The model is not ready ({state.not_ready_reason}).", headers={"Retry-After": "5"})
    return state


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StateDep = Annotated[ServingState, Depends(get_state)]
ReadyStateDep = Annotated[ServingState, Depends(get_ready_state)]
