"""An OpenAI-compatible client other than OpenAI's SDK: Vercel's AI SDK (npm `ai` with
`@ai-sdk/openai-compatible`, installed by `make test`), run by Node against the real service:
plain and streamed completions, an error, and a stream the client aborts midway, which the
service must record as `cancelled`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.support.app import make_settings
from tests.support.http_servers import running_app
from tests.support.skips import missing

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "clients" / "ai_sdk.mjs"


def _modules() -> Path:
    found = os.environ.get("AI_SDK_MODULES") or str(
        Path.home() / ".cache" / "itemstream" / "ai-sdk" / "node_modules"
    )
    if shutil.which("node") is None or not Path(found, "ai").exists():
        missing("the AI SDK (npm ai, @ai-sdk/openai-compatible); `make test` installs it")
    return Path(found)


async def test_vercel_ai_sdk_against_the_service(tmp_path: Path) -> None:
    modules = _modules()
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    settings = make_settings(url, mock_tokens=20, mock_token_delay=0.05, max_prompt_chars=30_000)
    from app.db.migrations import migrate

    await migrate(settings.db.app_url)
    async with running_app(settings) as base:
        # Node resolves bare imports from a node_modules beside the script: link the cached one.
        work = tmp_path / "client"
        work.mkdir()
        shutil.copy(CLIENT, work / "ai_sdk.mjs")
        (work / "node_modules").symlink_to(modules)
        done = await asyncio.to_thread(
            subprocess.run,
            ["node", str(work / "ai_sdk.mjs"), f"{base}/v1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        async with httpx.AsyncClient(base_url=base) as client:
            await asyncio.sleep(0.5)  # the aborted stream's outcome is written as it closes
            records = (await client.get("/metrics")).text
    assert seen["text"] and seen["finishReason"] == "length"
    assert seen["usage"]["completionTokens"] == 5 and seen["usage"]["promptTokens"] == 3
    assert seen["streamedText"] and seen["streamedFinish"] == "stop"
    assert seen["error"]["status"] == 400 and "prompt" in seen["error"]["message"]
    assert seen["abort"]["received"] == 3 and seen["abort"]["ended"] != "normally"
    assert 'outcome="cancelled"' in records
