"""TLS to the broker: a private Mosquitto with a TLS listener and certificates made for the test."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from core.foundation.config import load_settings
from core.router import Router
from core.runtime.runtime import Runtime
from tests.integration.conftest import BrokerTarget, ServeFn
from tests.support.rt_wait import wait_until

pytestmark = pytest.mark.timeout(90)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(cwd: Path, name: str, subject: str, extension: str) -> None:
    """`<name>.key` and `<name>.crt`, signed by the test CA in `cwd`."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=cwd)
    (cwd / f"{name}.ext").write_text(extension + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    cwd = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=mqtt-app test CA", cwd=cwd)
    _signed(cwd, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    _signed(cwd, "client", "/CN=mqtt-app-client", "extendedKeyUsage=clientAuth")
    return cwd


def _tls_broker(factory: Any, certs: Path, *, require_certificate: bool) -> BrokerTarget:
    conf = f"cafile {certs / 'ca.crt'}\ncertfile {certs / 'server.crt'}\nkeyfile {certs / 'server.key'}\n"
    if require_certificate:
        conf += "require_certificate true\n"
    server = factory(extra_conf=conf)
    return BrokerTarget("mosquitto", server.host, server.port, v5=True)


async def _round_trip(runtime: Runtime, topic: str, got: list[Any]) -> None:
    await runtime.client.publish(topic, {"over": "tls"}, qos=1)
    await wait_until(lambda: got == [{"over": "tls"}], "the message published and received over TLS")


@pytest.mark.parametrize("client_certificate", [False, True])
async def test_runtime_talks_to_a_tls_broker(mosquitto_factory: Any, serve: ServeFn, certs: Path, unique_id: str,
                                             client_certificate: bool) -> None:
    target = _tls_broker(mosquitto_factory, certs, require_certificate=client_certificate)
    got: list[Any] = []

    async def handler(payload: Any) -> None:
        got.append(payload)

    router = Router()
    router.on(f"{unique_id}/secure", handler, qos=1)
    env = {"MQTT_TLS": "true", "MQTT_TLS_CA": str(certs / "ca.crt")}
    if client_certificate:
        env |= {"MQTT_TLS_CERT": str(certs / "client.crt"), "MQTT_TLS_KEY": str(certs / "client.key")}
    runtime = await serve(target, router, **env)
    await _round_trip(runtime, f"{unique_id}/secure", got)


async def test_an_untrusted_broker_certificate_is_refused_unless_insecure(
        mosquitto_factory: Any, serve: ServeFn, certs: Path, unique_id: str) -> None:
    target = _tls_broker(mosquitto_factory, certs, require_certificate=False)
    # Without MQTT_TLS_CA the system's CAs are used, and they do not know the test CA.
    settings = load_settings({**target.env(), "MQTT_TLS": "true", "MQTT_CLIENT_ID": f"{unique_id}-untrusted",
                              "MQTT_RECONNECT_MIN": "0.1", "MQTT_RECONNECT_MAX": "0.2"})
    refused = Runtime(settings, [])
    await refused.start()
    try:
        assert not await refused.wait_ready(2)
        assert "CERTIFICATE_VERIFY_FAILED" in (refused.client.state.last_error or "")
    finally:
        await refused.stop()

    got: list[Any] = []

    async def handler(payload: Any) -> None:
        got.append(payload)

    router = Router()
    router.on(f"{unique_id}/insecure", handler, qos=1)
    runtime = await serve(target, router, MQTT_TLS="true", MQTT_TLS_INSECURE="true")
    await _round_trip(runtime, f"{unique_id}/insecure", got)
