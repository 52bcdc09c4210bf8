"""The router serving HTTPS with the certificate and key it is given."""

from __future__ import annotations

import subprocess

import openai
import pytest
import requests
from test_router_helpers import MODEL, RouterFleet

from support.procs import wait_http


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "router.crt", tmp_path / "router.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_router_serves_https_with_its_certificate(daemons, redis_url, certificate):
    cert, key = certificate
    fleet = RouterFleet(daemons, redis_url)
    fleet.sim("w1")
    port = daemons.port()
    daemon = daemons.start("router-tls", [daemons.script("gpufleet-router")], {
        "GPUFLEET_REDIS_URL": redis_url, "GPUFLEET_BIND": f"127.0.0.1:{port}",
        "GPUFLEET_VLLM_API_KEY": "sim-fleet-secret", "GPUFLEET_ROUTER_PROCESSES": "1",
        "GPUFLEET_ROUTER_TLS_CERT_FILE": str(cert), "GPUFLEET_ROUTER_TLS_KEY_FILE": str(key)})
    url = f"https://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=30, proc=daemon, verify=str(cert))

    client = openai.OpenAI(base_url=url + "/v1", api_key=fleet.key,
                           http_client=openai.DefaultHttpx2Client(verify=str(cert)))
    reply = client.chat.completions.create(model=MODEL, max_tokens=4,
                                           messages=[{"role": "user", "content": "over TLS"}])
    assert reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": "streamed"}]))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)

    # the certificate is the one configured: an unverified client sees a self-signed chain
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url + "/healthz", timeout=5)
    # and plain HTTP on the same port is not served
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
