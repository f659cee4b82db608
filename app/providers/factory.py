"""Pick the provider the settings name."""

from __future__ import annotations

from app.config import Settings
from app.providers.base import Provider
from app.providers.mock import MockProvider
from app.providers.openai import OpenAICompatibleProvider
from app.telemetry import tracing


def create_provider(settings: Settings) -> Provider:
    """Call in the lifespan (once per worker): the upstream client owns a connection pool."""
    if settings.llm_provider == "openai":
        assert settings.llm_base_url is not None  # Settings validation guarantees it
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        provider = OpenAICompatibleProvider(
            settings.llm_base_url,
            api_key=key,
            connect_timeout=settings.llm_connect_timeout,
            read_timeout=settings.llm_read_timeout,
            max_connections=settings.llm_max_connections,
            retries=settings.llm_retries,
        )
        tracing.instrument_http_client(provider.client)
        return provider
    return MockProvider(
        tokens=settings.mock_tokens,
        token_delay=settings.mock_token_delay,
        first_token_delay=settings.mock_first_token_delay,
        fail_after=settings.mock_fail_after,
    )
