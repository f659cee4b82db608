"""The edge of the service as it runs (gunicorn, uvicorn workers): behind a root path, and with
clients that leave before the first byte."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from harness.processes import wait_until
from harness.servers import clean_env, serve

pytestmark = pytest.mark.slow


def _pod_ip() -> str:
    """An address of this machine other than the loopback name the tests use: what a kubelet
    probe sends as Host (the pod IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.2"


def test_behind_a_root_path_probes_answer_any_host_and_links_keep_the_prefix(
    tmp_path: Path,
) -> None:
    env = clean_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'root.db'}",
        ROOT_PATH="/api",
        ALLOWED_HOSTS="api.example.com",
        LOG_LEVEL="INFO",
    )
    with serve(env) as server:
        port = server.base.rsplit(":", 1)[1]
        pod = {"Host": f"{_pod_ip()}:{port}"}
        for path in ("/livez", "/readyz", "/metrics"):
            # The kubelet probes the pod directly (the proxy strips the prefix for the rest):
            # no prefix, the pod IP as Host.
            assert httpx.get(server.base + path, headers=pod).status_code == 200, path
        api = {"Host": "api.example.com"}
        refused = httpx.get(f"{server.base}/v1/items", headers=pod)
        assert refused.status_code == 400, "other Hosts are still refused"
        made = httpx.post(f"{server.base}/v1/items", json={"name": "r", "price": 1}, headers=api)
        assert made.status_code == 201 and made.headers["location"].startswith("/api/v1/items/")
        docs = httpx.get(f"{server.base}/docs", headers=api)
        assert '"/api/openapi.json"' in docs.text or "'/api/openapi.json'" in docs.text
        assert "/api/static/docs/swagger-ui-bundle.js" in docs.text
        redirect = httpx.get(f"{server.base}/", headers=api)
        assert redirect.headers["location"] == "/api/docs"
        scrape = httpx.get(f"{server.base}/metrics").text
        assert 'handler="/livez"' not in scrape and 'handler="/readyz"' not in scrape
        time.sleep(0.3)
        access = [
            line
            for line in server.json_lines()
            if line.get("logger") == "itemstream.access" and line["level"] == "info"
        ]
        assert access and not [a for a in access if a["http"]["route"] in ("/livez", "/readyz")]


def test_a_client_leaving_before_the_first_token_is_499_not_a_5xx(tmp_path: Path) -> None:
    env = clean_env(
        DATABASE_URL=f"sqlite:///{tmp_path / 'leave.db'}",
        MOCK_FIRST_TOKEN_DELAY="2",
        LOG_LEVEL="INFO",
    )
    with serve(env) as server:
        body = {
            "model": "itemstream-mock",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        for _ in range(3):
            with (
                pytest.raises(httpx.ReadTimeout),
                httpx.stream(
                    "POST", f"{server.base}/v1/chat/completions", json=body, timeout=0.3
                ) as response,
            ):
                response.read()

        def counted() -> bool:
            return 'status="499"' in httpx.get(f"{server.base}/metrics").text

        assert wait_until(counted, 10), "the disconnects were not counted"
        scrape = httpx.get(f"{server.base}/metrics").text
        lines = [line for line in scrape.splitlines() if line.startswith("http_requests_total")]
        chat = [line for line in lines if "/v1/chat/completions" in line]
        assert any('status="499"' in line and line.endswith(" 3.0") for line in chat), chat
        assert not [line for line in lines if 'status="5' in line], lines
        access = [
            line["http"]["status"]
            for line in server.json_lines()
            if line.get("logger") == "itemstream.access"
            and line["http"]["route"] == "/v1/chat/completions"
        ]
        assert access == [499, 499, 499], access
