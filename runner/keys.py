"""ZeroMQ CURVE keys: generate and load key pairs, configure server and client sockets, and refuse to bind a
non-loopback address without security.

A key pair is two files in the ZeroMQ certificate format (as `zmq.auth.create_certificates` writes them):
`NAME.key` holds the public key and may be copied anywhere; `NAME.key_secret` holds both keys and is private (mode
600). A CURVE server admits exactly the clients whose public `*.key` files sit in its authorized-keys directory; the
check runs in a ZAP handler (`zmq.auth.thread.ThreadAuthenticator`, one per context) through a credentials callback
rather than `configure_curve(location=...)`, because the callback re-reads the directory on each handshake (adding a
worker's key needs no restart), skips a malformed key file instead of refusing everyone, and logs refused clients at
WARNING (pyzmq logs them only at DEBUG).

Roles: where a client's public key sits in the authorized-keys directory says what it may do on the coordinator's
control socket (`key_roles`): `workers/` (or the directory itself, as before roles existed) a generation worker,
`learners/` a learner (publishes weights and progress), `observers/` only reads status. A key in several places has
every role it is listed under. `runner keys authorize` copies a public key into the right place.

Call `curve_server` / `curve_client` on a socket *before* `bind` / `connect`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from runner.config import ConfigError

log = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_LOCAL_TRANSPORTS = ("ipc", "inproc")
ZAP_DOMAIN = "runner"
ROLE_DIRS = {"worker": "workers", "learner": "learners", "observer": "observers"}  # role -> subdirectory


class KeyFileError(ConfigError):
    """A key file or directory is missing or is not what it should be; the message is one line for the user."""


class InsecureBindError(ConfigError):
    """A non-loopback address would be bound without CURVE keys or an API token."""


# --------------------------------------------------------------------------- key files


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} is not valid; expected a plain file name such as 'coordinator'")


def require_curve() -> None:
    """Fail clearly when this libzmq was built without CURVE (libsodium / tweetnacl)."""
    if not zmq.has("curve"):
        raise RuntimeError(
            f"libzmq {zmq.zmq_version()} was built without CURVE support; reinstall pyzmq from its wheels"
        )


def key_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """The (public, secret) file paths of key pair `name` in `out_dir`."""
    _check_name(name)
    return Path(out_dir) / f"{name}{PUBLIC_SUFFIX}", Path(out_dir) / f"{name}{SECRET_SUFFIX}"


def generate_keypair(out_dir: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write a new CURVE key pair `out_dir/NAME.key` (public) and `out_dir/NAME.key_secret` (secret, mode 600).

    Both files appear atomically (written in a private temporary directory, then renamed into place). Existing keys
    are never replaced unless `force`. Returns (public_path, secret_path)."""
    require_curve()
    out_dir = Path(out_dir)
    public, secret = key_paths(out_dir, name)
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists; pass --force to replace the key pair '{name}'")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))  # mode 700: nobody else sees the secret
    try:
        tmp_public, tmp_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        os.chmod(tmp_secret, 0o600)
        os.chmod(tmp_public, 0o644)
        os.replace(tmp_secret, secret)  # secret first: a public key never exists without its secret
        os.replace(tmp_public, public)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote CURVE key pair %s (public) and %s (secret)", public, secret)
    return public, secret


def _valid_z85_key(key: bytes | None) -> bool:
    if not key or len(key) != 40:
        return False
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, IndexError, TypeError):
        return False
    return True


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{what} {path} not found; expected a file written by `runner keys generate`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as e:
        raise KeyFileError(f"{what} {path} is not a ZeroMQ certificate ({e})") from None
    if not (_valid_z85_key(public) and (secret is None or _valid_z85_key(secret))):
        raise KeyFileError(
            f"{what} {path} does not hold a 40-character z85 CURVE key; "
            "expected a file written by `runner keys generate`"
        )
    return public, secret


def load_keypair(secret_path: Path) -> tuple[bytes, bytes]:
    """Read (public, secret) z85 keys from a `NAME.key_secret` file."""
    public, secret = _load(secret_path, "CURVE secret key file")
    if not secret:
        raise KeyFileError(f"{secret_path} holds only a public key; expected the matching {SECRET_SUFFIX} file")
    if Path(secret_path).stat().st_mode & 0o077:
        log.warning("CURVE secret key file %s is readable by other users; run `chmod 600 %s`", secret_path, secret_path)
    return public, secret


def load_public_key(path: Path) -> bytes:
    """Read the z85 public key from a `NAME.key` (or `NAME.key_secret`) file."""
    return _load(path, "CURVE public key file")[0]


def authorized_key_files(directory: Path) -> list[Path]:
    """The public key files a CURVE server would admit; raises if the directory is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise KeyFileError(
            f"authorized keys directory {directory} not found; expected a directory of client *{PUBLIC_SUFFIX} files"
        )
    return sorted(
        [*directory.glob(f"*{PUBLIC_SUFFIX}"), *(p for d in ROLE_DIRS.values() for p in directory.glob(f"{d}/*.key"))]
    )


def key_roles(directory: Path) -> dict[bytes, frozenset[str]]:
    """Every authorized public key (z85) with its roles: from `workers/` (or the directory itself), `learners/` and
    `observers/`. Malformed key files are skipped with a warning; raises if the directory is missing."""
    directory = Path(directory)
    roles: dict[bytes, set[str]] = {}
    for path in authorized_key_files(directory):
        parent = path.parent.name if path.parent != directory else ROLE_DIRS["worker"]
        role = next(r for r, d in ROLE_DIRS.items() if d == parent)
        try:
            roles.setdefault(load_public_key(path), set()).add(role)
        except KeyFileError as e:
            log.warning("ignoring %s", e)
    return {key: frozenset(r) for key, r in roles.items()}


def authorize_key(public_file: Path, directory: Path, role: str, name: str | None = None) -> Path:
    """Copy the public key in `public_file` into `directory/ROLE_DIR/NAME.key` (atomically; NAME defaults to the
    file's), so a coordinator authorizing `directory` admits it in `role`. Refuses a secret key file, and a name
    already taken by another key."""
    if role not in ROLE_DIRS:
        raise KeyFileError(f"role {role!r} is not one of {sorted(ROLE_DIRS)}")
    public, secret = _load(public_file, "CURVE public key file")
    if secret:
        raise KeyFileError(f"{public_file} holds a secret key; give its public {PUBLIC_SUFFIX} file instead")
    name = name or Path(public_file).name.split(".", 1)[0]
    target, _ = key_paths(Path(directory) / ROLE_DIRS[role], name)
    if target.exists() and load_public_key(target) != public:
        raise FileExistsError(f"{target} already holds another key; pass another --name or remove it first")
    from runner.files import write_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, Path(public_file).read_bytes())
    log.info("authorized %s in role %s: %s", public.decode(), role, target)
    return target


# --------------------------------------------------------------------------- sockets


class AuthorizedKeys:
    """ZAP credentials provider: admits the public keys found in a directory of `*.key` files.

    The directory is re-read on every handshake (handshakes happen once per connection), so adding or deleting a
    client's key file takes effect for its next connection without restarting the server. Refusals are logged at
    WARNING with the client's public key."""

    def __init__(self, directory: Path, also_allow: frozenset[bytes] = frozenset()):
        self.directory = Path(directory)
        self.also_allow = also_allow  # e.g. the server's own key, which its local child processes use

    def keys(self) -> set[bytes]:
        return set(key_roles(self.directory))

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = key in self.also_allow or key in self.keys()
        except KeyFileError as e:
            log.error("refusing every CURVE client: %s", e)
            return False
        if allowed:
            log.debug("admitted CURVE client %s", key.decode())
        else:
            log.warning("refused CURVE client %s: its public key is not in %s", key.decode(), self.directory)
        return allowed


_authenticators: weakref.WeakKeyDictionary[zmq.Context, ThreadAuthenticator] = weakref.WeakKeyDictionary()
_auth_lock = threading.Lock()


def _authenticator(
    context: zmq.Context, authorized_dir: Path, also_allow: frozenset[bytes] = frozenset()
) -> ThreadAuthenticator:
    """Start (once per context) the ZAP handler that admits only the public keys in `authorized_dir`."""
    with _auth_lock:
        auth = _authenticators.get(context)
        if auth is not None and auth.is_alive():
            current = auth.credentials_providers["*"].directory
            if current != authorized_dir:
                raise ValueError(
                    f"this ZeroMQ context already authorizes keys from {current}; "
                    f"expected the same directory, got {authorized_dir}"
                )
            return auth
        auth = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        auth.start()
        provider = AuthorizedKeys(authorized_dir, also_allow)
        for domain in ("*", ZAP_DOMAIN):  # '*' serves sockets of this context that set no ZAP domain
            auth.configure_curve_callback(domain=domain, credentials_provider=provider)
        _authenticators[context] = auth
        return auth


def stop_authenticator(context: zmq.Context) -> None:
    """Stop the ZAP handler started for `context` by `curve_server` (call before `context.term()`)."""
    with _auth_lock:
        auth = _authenticators.pop(context, None)
    if auth is not None:
        auth.stop()


def _enforce_zap(socket: zmq.Socket) -> bool:
    """Make libzmq refuse clients when no ZAP handler answers; False if this libzmq lacks the (draft) option."""
    socket.zap_domain = ZAP_DOMAIN.encode()
    try:
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    except (AttributeError, zmq.ZMQError):
        log.debug(
            "libzmq %s lacks ZMQ_ZAP_ENFORCE_DOMAIN; CURVE relies on the running authenticator", zmq.zmq_version()
        )
        return False
    return True


def curve_server(
    socket: zmq.Socket, secret_key_file: Path, authorized_keys_dir: Path, also_allow: Iterable[bytes] = ()
) -> ThreadAuthenticator:
    """Make `socket` a CURVE server that admits only clients whose public keys are in `authorized_keys_dir`.

    Call before `socket.bind`. Starts the context's authenticator on first use and returns it; stop it with
    `stop_authenticator(socket.context)` after closing the CURVE sockets.

    The socket gets ZAP domain 'runner' and ZMQ_ZAP_ENFORCE_DOMAIN: by default libzmq admits *every* CURVE client
    when no ZAP handler is running; with both set it refuses them instead (libzmq 4.3.5's behaviour; the option
    alone, with an empty domain, would skip ZAP altogether)."""
    require_curve()
    public, secret = load_keypair(secret_key_file)
    authorized_dir = Path(authorized_keys_dir).resolve()
    keys = authorized_key_files(authorized_dir)
    if not keys:
        log.warning("no client public keys in %s: every client will be refused", authorized_dir)
    auth = _authenticator(socket.context, authorized_dir, frozenset(also_allow))
    _enforce_zap(socket)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    log.debug("CURVE server socket with %d authorized client key(s) from %s", len(keys), authorized_dir)
    return auth


def curve_client(socket: zmq.Socket, client_secret_file: Path, server_public_file: Path) -> None:
    """Make `socket` a CURVE client with its own key pair that trusts only the given server key. Call before connect."""
    require_curve()
    public, secret = load_keypair(client_secret_file)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = load_public_key(server_public_file)


# --------------------------------------------------------------------------- bind policy


def endpoint_host(endpoint: str) -> str:
    """The host part of 'tcp://HOST:PORT', 'http://HOST:PORT', 'HOST:PORT' or a bare host ('[::1]' -> '::1')."""
    text = endpoint.strip()
    if "://" not in text:
        text = "tcp://" + text
    parts = urlsplit(text)
    netloc = parts.netloc
    if netloc.startswith("["):  # [v6]:port
        return netloc[1 : netloc.index("]")] if "]" in netloc else netloc[1:]
    if netloc.count(":") > 1:  # bare IPv6 without brackets
        return netloc
    return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc


def is_loopback(endpoint: str) -> bool:
    """True when `endpoint` can only be reached from this machine: tcp://127.x.x.x, localhost, ::1, ipc://, inproc://.

    Wildcards ('*', 0.0.0.0, ::), interface names and every other address count as reachable from the network."""
    scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else ""
    if scheme in _LOCAL_TRANSPORTS:
        return True
    host = endpoint_host(endpoint).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a DNS name or interface name may resolve to anything


def require_security(
    bind_endpoints: Iterable[str],
    curve_secret: str | Path | None,
    api_token: str | None,
    *,
    authorized_keys: str | Path | None = None,
) -> None:
    """Refuse to bind any non-loopback endpoint unless CURVE keys and an API token are configured.

    `curve_secret` and `authorized_keys` are paths ([security] curve_secret_key / authorized_keys); the check on
    `authorized_keys` runs only when it is given (not None). Loopback-only binds need nothing. Raises
    InsecureBindError (a ValueError) with one sentence naming the address and the missing setting."""
    exposed = [e for e in bind_endpoints if not is_loopback(e)]
    if not exposed:
        return
    where = exposed[0]
    hint = "run `runner keys generate` and set [security] curve_secret_key, curve_public_key and authorized_keys"
    if not curve_secret:
        raise InsecureBindError(f"refusing to bind {where} without CURVE keys: {hint}")
    if not Path(curve_secret).is_file():
        raise InsecureBindError(f"refusing to bind {where}: CURVE secret key file {curve_secret} not found; {hint}")
    if authorized_keys is not None:
        if not authorized_keys:
            raise InsecureBindError(f"refusing to bind {where} without an authorized keys directory: {hint}")
        if not Path(authorized_keys).is_dir():
            raise InsecureBindError(
                f"refusing to bind {where}: authorized keys directory {authorized_keys} not found; {hint}"
            )
    require_api_token([where], api_token)


def require_api_token(
    bind_endpoints: Iterable[str],
    api_token: str | None,
    how: str = "put a long random string in a 0600 file named by [security] api_token_file (or in api_token, or in "
    "RUNNER_API_TOKEN)",
) -> None:
    """Refuse to bind any non-loopback endpoint without an HTTP API token (the rule `runner launch` and
    `runner serve` share); `how` tells the user where to give one. Raises InsecureBindError in one sentence."""
    exposed = [e for e in bind_endpoints if not is_loopback(e)]
    if exposed and not api_token:
        raise InsecureBindError(f"refusing to bind {exposed[0]} without an API token: {how}")
