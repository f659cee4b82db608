"""Pick the provider the settings name."""

from __future__ import annotations

from app.config import LlmSettings
from app.providers.base import Provider
from app.providers.mock import MockProvider
from app.providers.openai import OpenAICompatibleProvider
from app.telemetry import tracing


def create_provider(llm: LlmSettings) -> Provider:
    """Call in the lifespan (once per worker): the upstream client owns a connection pool."""
    if llm.provider == "openai":
        assert llm.base_url is not None  # LlmSettings validation guarantees it
        key = llm.api_key.get_secret_value() if llm.api_key else None
        provider = OpenAICompatibleProvider(
            llm.base_url,
            api_key=key,
            connect_timeout=llm.connect_timeout,
            read_timeout=llm.read_timeout,
            max_connections=llm.max_connections,
            retries=llm.retries,
        )
        tracing.instrument_http_client(provider.client)
        return provider
    return MockProvider(
        tokens=llm.mock.tokens,
        token_delay=llm.mock.token_delay,
        first_token_delay=llm.mock.first_token_delay,
        fail_after=llm.mock.fail_after,
    )
