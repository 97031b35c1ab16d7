"""`mdi serve`: the OpenAI-compatible HTTP API and the chat page, over the engine."""
from .app import EngineFactory, ServeConfig, create_app
from .server import BackgroundServer, serve

__all__ = ["BackgroundServer", "EngineFactory", "ServeConfig", "create_app", "serve"]
