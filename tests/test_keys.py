"""Tests for runner.keys: CURVE key files, authenticated ZeroMQ over real TCP, and the bind policy."""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

import pytest
import zmq

from runner import keys
from runner.cli import main as runner_main
from runner.keys import (
    InsecureBindError,
    KeyFileError,
    authorize_key,
    curve_client,
    curve_server,
    generate_keypair,
    is_loopback,
    key_roles,
    load_keypair,
    load_public_key,
    require_security,
    stop_authenticator,
)

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


# --------------------------------------------------------------------------- fixtures


class Net:
    """A ZeroMQ context whose sockets and authenticator are always cleaned up."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int) -> zmq.Socket:
        s = self.context.socket(kind)
        s.linger = 0
        self.sockets.append(s)
        return s

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        stop_authenticator(self.context)
        self.context.term()


@pytest.fixture
def net():
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A server key pair, an authorized client, and a stranger whose key is not authorized."""
    server_pub, server_sec = generate_keypair(tmp_path / "server", "coordinator")
    authorized = tmp_path / "authorized"
    client_pub, client_sec = generate_keypair(tmp_path / "client", "worker-a")
    authorized.mkdir()
    (authorized / client_pub.name).write_bytes(client_pub.read_bytes())
    _, stranger_sec = generate_keypair(tmp_path / "stranger", "worker-b")
    return {
        "server_pub": server_pub,
        "server_sec": server_sec,
        "authorized": authorized,
        "client_sec": client_sec,
        "stranger_sec": stranger_sec,
    }


def _router(net: Net, pki: dict[str, Path]) -> tuple[zmq.Socket, str]:
    router = net.socket(zmq.ROUTER)
    curve_server(router, pki["server_sec"], pki["authorized"])
    port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, f"tcp://127.0.0.1:{port}"


def _dealer(net: Net, endpoint: str, secret: Path, server_pub: Path) -> zmq.Socket:
    dealer = net.socket(zmq.DEALER)
    curve_client(dealer, secret, server_pub)
    dealer.connect(endpoint)
    return dealer


def _recv_within(socket: zmq.Socket, seconds: float) -> list[bytes] | None:
    if socket.poll(int(seconds * 1000), zmq.POLLIN):
        return socket.recv_multipart()
    return None


# --------------------------------------------------------------------------- key files


def test_generate_writes_both_files_with_private_secret(tmp_path: Path):
    public, secret = generate_keypair(tmp_path / "keys", "coordinator")
    assert public == tmp_path / "keys" / "coordinator.key"
    assert secret == tmp_path / "keys" / "coordinator.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"secret-key" not in public.read_bytes()
    pub, sec = load_keypair(secret)
    assert len(pub) == 40 and len(sec) == 40
    assert load_public_key(public) == pub
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["coordinator.key", "coordinator.key_secret"]


def test_generate_refuses_to_overwrite_unless_forced(tmp_path: Path):
    _, secret = generate_keypair(tmp_path, "node")
    first = load_keypair(secret)
    with pytest.raises(FileExistsError, match="already exists.*--force"):
        generate_keypair(tmp_path, "node")
    assert load_keypair(secret) == first
    generate_keypair(tmp_path, "node", force=True)
    assert load_keypair(secret) != first
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden"])
def test_generate_rejects_bad_names(tmp_path: Path, name: str):
    with pytest.raises(KeyFileError, match="key name"):
        generate_keypair(tmp_path, name)


def test_load_keypair_errors_are_clear(tmp_path: Path):
    with pytest.raises(KeyFileError, match="not found"):
        load_keypair(tmp_path / "missing.key_secret")
    junk = tmp_path / "junk.key_secret"
    junk.write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a ZeroMQ certificate"):
        load_keypair(junk)
    bad = tmp_path / "bad.key_secret"
    bad.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    with pytest.raises(KeyFileError, match="40-character"):
        load_keypair(bad)
    public, _ = generate_keypair(tmp_path, "pub")
    with pytest.raises(KeyFileError, match="only a public key"):
        load_keypair(public)


def test_load_keypair_warns_about_readable_secret(tmp_path: Path, caplog):
    _, secret = generate_keypair(tmp_path, "loose")
    secret.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="runner.keys"):
        load_keypair(secret)
    assert "chmod 600" in caplog.text


# --------------------------------------------------------------------------- CURVE over TCP


def test_authorized_client_talks_to_curve_router(net, pki):
    router, endpoint = _router(net, pki)
    dealer = _dealer(net, endpoint, pki["client_sec"], pki["server_pub"])
    dealer.send_multipart([b"hello"])
    msg = _recv_within(router, 5.0)
    assert msg is not None and msg[-1] == b"hello"
    router.send_multipart([msg[0], b"welcome"])
    assert _recv_within(dealer, 5.0) == [b"welcome"]


def test_unknown_client_is_refused_and_logged(net, pki, caplog):
    router, endpoint = _router(net, pki)
    with caplog.at_level(logging.WARNING, logger="runner.keys"):
        stranger = _dealer(net, endpoint, pki["stranger_sec"], pki["server_pub"])
        stranger.send_multipart([b"let me in"])
        assert _recv_within(router, 1.0) is None
        deadline = time.monotonic() + 5.0
        while "refused CURVE client" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "refused CURVE client" in caplog.text
    stranger_pub = load_keypair(pki["stranger_sec"])[0].decode()
    assert stranger_pub in caplog.text
    # The authorized client on the same router still gets through.
    dealer = _dealer(net, endpoint, pki["client_sec"], pki["server_pub"])
    dealer.send_multipart([b"hello"])
    msg = _recv_within(router, 5.0)
    assert msg is not None and msg[-1] == b"hello"


def test_client_with_wrong_server_key_gets_nothing_through(net, pki, tmp_path):
    router, endpoint = _router(net, pki)
    impostor_pub, _ = generate_keypair(tmp_path / "impostor", "fake-server")
    dealer = _dealer(net, endpoint, pki["client_sec"], impostor_pub)
    dealer.send_multipart([b"hello"])
    assert _recv_within(router, 1.0) is None


def test_adding_a_key_takes_effect_without_restart(net, pki):
    router, endpoint = _router(net, pki)
    stranger_pub = pki["stranger_sec"].with_suffix(".key")
    (pki["authorized"] / stranger_pub.name).write_bytes(stranger_pub.read_bytes())
    dealer = _dealer(net, endpoint, pki["stranger_sec"], pki["server_pub"])
    dealer.send_multipart([b"now known"])
    msg = _recv_within(router, 5.0)
    assert msg is not None and msg[-1] == b"now known"


def test_curve_server_refuses_everyone_once_its_authenticator_is_gone(net, pki):
    router = net.socket(zmq.ROUTER)
    curve_server(router, pki["server_sec"], pki["authorized"])
    probe = net.socket(zmq.ROUTER)
    if not keys._enforce_zap(probe):
        pytest.skip("this libzmq lacks ZMQ_ZAP_ENFORCE_DOMAIN")
    stop_authenticator(net.context)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = _dealer(net, f"tcp://127.0.0.1:{port}", pki["client_sec"], pki["server_pub"])
    dealer.send_multipart([b"hello"])
    assert _recv_within(router, 1.0) is None


def test_one_authenticator_per_context(net, pki, tmp_path):
    a = curve_server(net.socket(zmq.ROUTER), pki["server_sec"], pki["authorized"])
    b = curve_server(net.socket(zmq.PUB), pki["server_sec"], pki["authorized"])
    assert a is b and a.is_alive()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="already authorizes keys"):
        curve_server(net.socket(zmq.ROUTER), pki["server_sec"], other)


def test_curve_server_needs_an_existing_authorized_dir(net, pki, tmp_path):
    with pytest.raises(KeyFileError, match="authorized keys directory"):
        curve_server(net.socket(zmq.ROUTER), pki["server_sec"], tmp_path / "nope")


def test_malformed_authorized_key_is_skipped(net, pki):
    (pki["authorized"] / "broken.key").write_text("not a certificate\n")
    router, endpoint = _router(net, pki)
    dealer = _dealer(net, endpoint, pki["client_sec"], pki["server_pub"])
    dealer.send_multipart([b"hello"])
    msg = _recv_within(router, 5.0)
    assert msg is not None and msg[-1] == b"hello"


def test_a_keys_place_gives_its_roles_and_runner_keys_authorize_lays_it_out(net, pki, tmp_path, capsys):
    learner_pub, _ = generate_keypair(tmp_path / "k", "learner-mac")
    observer_pub, observer_sec = generate_keypair(tmp_path / "k", "laptop")
    assert (
        runner_main(["keys", "authorize", str(learner_pub), "--dir", str(pki["authorized"]), "--role", "learner"]) == 0
    )
    assert str(pki["authorized"] / "learners" / "learner-mac.key") in capsys.readouterr().out
    authorize_key(observer_pub, pki["authorized"], "observer")
    authorize_key(learner_pub, pki["authorized"], "worker")  # a key in two places has both roles
    roles = key_roles(pki["authorized"])
    assert roles == {
        load_public_key(pki["client_sec"]): {"worker"},  # at the top level, as before roles existed: a worker
        load_public_key(learner_pub): {"learner", "worker"},
        load_public_key(observer_pub): {"observer"},
    }
    # A key in a role's subdirectory is admitted by the CURVE server like one at the top level.
    router, endpoint = _router(net, pki)
    _dealer(net, endpoint, observer_sec, pki["server_pub"]).send_multipart([b"status?"])
    assert (_recv_within(router, 5.0) or [b""])[-1] == b"status?"
    # Bad input changes nothing: a secret key file, an unknown role, a name taken by another key.
    other_pub, _ = generate_keypair(tmp_path / "k", "other")
    with pytest.raises(KeyFileError, match="secret"):
        authorize_key(observer_sec, pki["authorized"], "worker")
    with pytest.raises(KeyFileError, match="role 'admin'"):
        authorize_key(observer_pub, pki["authorized"], "admin")
    with pytest.raises(FileExistsError, match="another key"):
        authorize_key(other_pub, pki["authorized"], "learner", name="learner-mac")
    assert key_roles(pki["authorized"]) == roles


# --------------------------------------------------------------------------- bind policy


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://127.3.2.1:1",
        "tcp://localhost:5555",
        "tcp://[::1]:5555",
        "127.0.0.1:8000",
        "http://localhost:8000",
        "localhost",
        "::1",
        "ipc:///tmp/runner.sock",
        "inproc://weights",
    ],
)
def test_is_loopback_true(endpoint: str):
    assert is_loopback(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://0.0.0.0:5555",
        "tcp://*:5555",
        "tcp://[::]:5555",
        "tcp://192.168.1.20:5555",
        "tcp://10.0.0.1:5555",
        "tcp://eth0:5555",
        "tcp://mac-studio.local:5555",
        "0.0.0.0:8000",
        "128.0.0.1:80",
    ],
)
def test_is_loopback_false(endpoint: str):
    assert not is_loopback(endpoint)


def test_require_security_allows_loopback_without_anything():
    require_security(["tcp://127.0.0.1:5555", "tcp://localhost:5556", "127.0.0.1:8000"], "", "")


def test_require_security_refuses_open_bind_without_keys():
    with pytest.raises(InsecureBindError) as e:
        require_security(["tcp://127.0.0.1:5556", "tcp://0.0.0.0:5555"], "", "token")
    text = str(e.value)
    assert "refusing to bind tcp://0.0.0.0:5555 without CURVE keys" in text
    assert "runner keys generate" in text and "[security]" in text
    assert "\n" not in text
    assert isinstance(e.value, ValueError)


def test_require_security_refuses_open_bind_without_token(tmp_path: Path):
    _, secret = generate_keypair(tmp_path, "coordinator")
    with pytest.raises(InsecureBindError, match=r"tcp://\*:5555 without an API token.*api_token"):
        require_security(["tcp://*:5555"], secret, "")


def test_require_security_checks_key_paths(tmp_path: Path):
    with pytest.raises(InsecureBindError, match="secret key file .* not found"):
        require_security(["tcp://0.0.0.0:5555"], tmp_path / "missing.key_secret", "token")
    _, secret = generate_keypair(tmp_path, "coordinator")
    with pytest.raises(InsecureBindError, match="authorized keys directory"):
        require_security(["tcp://0.0.0.0:5555"], secret, "token", authorized_keys="")
    with pytest.raises(InsecureBindError, match="not found"):
        require_security(["tcp://0.0.0.0:5555"], secret, "token", authorized_keys=tmp_path / "nope")


def test_require_security_passes_with_keys_and_token(tmp_path: Path):
    _, secret = generate_keypair(tmp_path, "coordinator")
    (tmp_path / "authorized").mkdir()
    require_security(["tcp://0.0.0.0:5555", "0.0.0.0:8000"], secret, "s3cret", authorized_keys=tmp_path / "authorized")
    require_security(["tcp://0.0.0.0:5555"], str(secret), "s3cret")


def test_keys_module_imports_no_mlx():
    import subprocess
    import sys

    code = (
        "import sys, runner.keys, runner.deploy; "
        "assert 'mlx' not in sys.modules, sorted(m for m in sys.modules if 'mlx' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert keys.PUBLIC_SUFFIX == ".key"
