"""The bus layer on its own: envelope, validation, subjects, the embedded server, auth pass-through."""
from __future__ import annotations

import dataclasses

import pytest

import nalar
from nalar.bus import envelope as env
from nalar.bus.errors import MalformedMessage, ServerNotFound
from nalar.bus.server import EmbeddedNats, find_server_binary
from nalar.bus.subjects import Subjects, check_token


def test_values_round_trip_and_non_json_is_a_type_error():
    @dataclasses.dataclass
    class P:
        x: int
        tag: str

    data = env.encode_call("m", [b"\x00\xffraw", {"nested": [b"b"]}, P(1, "t"), (1, 2)], {"k": None})
    call = env.decode_call(data, {env.H_ID: "f-1", env.H_DEADLINE: "123.5"}, "r", env.CallMessage)
    assert call.args == [b"\x00\xffraw", {"nested": [b"b"]}, {"x": 1, "tag": "t"}, [1, 2]]
    assert (call.meta.id, call.meta.request, call.meta.deadline, call.kwargs) == ("f-1", "f-1", 123.5, {"k": None})
    for bad in (object(), {1}, 1j, float):
        with pytest.raises(TypeError, match="cannot cross the bus"):
            env.dumps([bad])


@pytest.mark.parametrize("data,headers,why", [
    (b'{"m":"x","a":[]}', None, "no headers"),
    (b'{"m":"x","a":[]}', {}, "no headers"),
    (b'{"m":"x","a":[]}', {"Nalar-Id": "x" * 129}, "Nalar-Id"),
    (b"\xff\xfe", {"Nalar-Id": "a"}, "not JSON"),
    (b"[1]", {"Nalar-Id": "a"}, "JSON object"),
    (b'{"a":[]}', {"Nalar-Id": "a"}, "method"),
    (b'{"m":"x","a":{}}', {"Nalar-Id": "a"}, "'a' must be a list"),
    (b'{"m":"x"}', {"Nalar-Id": "a", "Nalar-Deadline": "soon"}, "non-numeric"),
    (b'{"m":"x"}', {"Nalar-Id": "a", "Nalar-Deadline": "inf"}, "finite"),
    (b'{"m":"x"}', {"Nalar-Id": "a", "Nalar-Priority": "1.5"}, "non-numeric"),
])
def test_malformed_calls_are_rejected_with_a_reason(data, headers, why):
    with pytest.raises(MalformedMessage, match=why):
        env.decode_call(data, headers, "", env.CallMessage)


def test_malformed_replies_are_rejected():
    assert env.decode_reply(b'{"v": [1]}') == (True, [1])
    assert env.decode_reply(b'{"e": {"type": "X"}}') == (False, {"type": "X"})
    for bad in (b"", b"null", b'{"x": 1}', b'{"e": "str"}', b"\x00"):
        with pytest.raises(MalformedMessage):
            env.decode_reply(bad)


def test_subject_tokens_are_checked():
    s = Subjects("prod-1")
    assert s.call("Analyst") == "nalar.prod-1.call.Analyst"
    for bad in ("a.b", "a*", "a>", "", "a b"):
        with pytest.raises(ValueError):
            check_token(bad, "name")
    with pytest.raises(ValueError):
        Subjects("has.dot")


def test_missing_server_binary_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NALAR_NATS_SERVER", "/nonexistent/nats-server")
    with pytest.raises(ServerNotFound, match="NALAR_NATS_SERVER"):
        find_server_binary()
    with pytest.raises(ServerNotFound):
        EmbeddedNats().start()


def test_embedded_server_has_jetstream_and_stops(tmp_path):
    import asyncio

    import nats

    server = EmbeddedNats(data_dir=str(tmp_path / "d"))
    url = server.start()
    pid = server.proc.pid if server.proc else 0

    async def js_info() -> int:
        nc = await nats.connect(url)
        info = await nc.jetstream().account_info()
        await nc.close()
        return info.limits.max_streams

    assert asyncio.run(js_info()) != 0
    server.stop()
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _refused_then_connects(url: str, monkeypatch, env_vars: dict, match: str | None = None) -> None:
    """Without the credentials the connect is refused clearly; with them (from the env) it works."""
    with pytest.raises(nalar.BusError, match=match):
        nalar.connect(url, "auth")
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    c = nalar.connect(url, "auth")
    try:
        assert c.status(timeout=0.3) == []  # connected; no nodes in this namespace
    finally:
        c.close()


@pytest.mark.parametrize("conf,env_vars", [
    ('authorization { token: "s3cret" }', {"NALAR_NATS_TOKEN": "s3cret"}),
    ('authorization { user: "ada", password: "lovelace" }', {"NALAR_NATS_USER": "ada", "NALAR_NATS_PASSWORD": "lovelace"}),
])
def test_auth_options_pass_through(tmp_path, monkeypatch, conf, env_vars):
    server = EmbeddedNats(data_dir=str(tmp_path / "d"), jetstream=False, extra_config=conf)
    url = server.start()
    try:
        _refused_then_connects(url, monkeypatch, env_vars, match="requires credentials and none were given")
    finally:
        server.stop()


def test_tls_options_pass_through(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    conf = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}'
    server = EmbeddedNats(data_dir=str(tmp_path / "d"), jetstream=False, extra_config=conf)
    url = server.start().replace("nats://", "tls://")
    try:  # the self-signed certificate is not trusted until NALAR_NATS_TLS_CA names it
        _refused_then_connects(url, monkeypatch, {"NALAR_NATS_TLS_CA": str(cert)}, match="CERTIFICATE_VERIFY_FAILED")
    finally:
        server.stop()


def test_nkey_auth_passes_through(tmp_path, monkeypatch):
    import os

    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    conf = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}'
    server = EmbeddedNats(data_dir=str(tmp_path / "d"), jetstream=False, extra_config=conf)
    url = server.start()
    try:
        _refused_then_connects(url, monkeypatch, {"NALAR_NATS_NKEY": str(seed_file)})
    finally:
        server.stop()
