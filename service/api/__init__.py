"""HTTP: the FastAPI app factory, routers, request context, API keys, uploads and response schemas."""
