"""
Configuration: defaults, YAML loading and strict validation.

Every tunable of the daemon and its default lives here. A config file only
needs to say what differs from the defaults; `listeners` is the one section
without a useful default outside the shipped config files.

Validation is strict: an unknown key or a bad value raises ConfigError whose
message starts with the key path, e.g.
`listeners[1].port: expected an integer 0-65535, got 'abc'`; load() puts
the file that set the key in front of it.

Drop-ins: load() merges every `*.yaml` of a config directory (by default
`conf.d` next to the main file: /etc/imaged/conf.d) over the main file, in
name order, so the host agent and the admin each own a file. Mappings are
merged key by key, anything else (lists, scalars) is replaced.
"""

import copy
import glob
import grp
import os
import re

import yaml

KiB = 1024
MiB = 1024**2

DEFAULT_FILE = "/etc/imaged/imaged.yaml"

# Most image bytes one GET .../checksum/blocks answer covers: a client asking
# for more gets fewer blocks and asks again, so one request stays within a
# client's timeout (1 GiB of data hashes in about a second here).
CHECKSUM_BLOCKS_WINDOW_BYTES = 1024**3

# The longest timeout a socket can honour: poll() takes milliseconds in a C
# int, and Python refuses larger ones ("timeout is too large").
MAX_TIMEOUT_S = (2**31 - 1) // 1000

# Sends smaller than this go to TLS without tls.write_buffer_bytes: below
# four 16 KiB records a buffer saves few write() calls.
TLS_WRITE_BUFFER_MIN_BYTES = 64 * KiB

# A response body of at most this many bytes, its length known, goes out
# whole with the response head in one write instead of through a corked
# connection (see web.StreamResponse): the copy costs less than the two
# setsockopt() calls, ~5% of imaged's Python samples answering 4 KiB GETs
# (py-spy --gil).
SMALL_BODY_BYTES = 64 * KiB

# Apps a listener can mount.
APPS = ("images", "sessions", "progress", "metrics", "ui")
LISTENER_KINDS = ("tls", "tcp", "unix")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEFAULTS = {
    "tls": {
        "cert_file": "/etc/pki/imaged/cert.pem",
        "key_file": "/etc/pki/imaged/key.pem",
        "ca_file": None,
        # Verify client certificates against ca_file on TLS listeners.
        "verify_clients": False,
        # Choose TLS_AES_128_GCM_SHA256 (ECDHE-*-AES128-GCM on TLS 1.2)
        # where the client offers it, among the suites the system allows:
        # clients ask for AES-256 first, and AES-128 costs the server less
        # CPU per byte (imaged.tls, docs/benchmarks.md).
        "prefer_aes128_gcm": True,
        # OpenSSL reads ahead up to this much in one call, and large
        # request bodies are read through a buffer this big (0: neither;
        # one record at a time, two read() calls per 16 KiB record).
        "read_buffer_bytes": 256 * KiB,
        # Large sends leave in writes of this much instead of one write()
        # per 16 KiB record (0: a write per record).
        "write_buffer_bytes": 256 * KiB,
    },
    "listeners": [],
    "images": {
        # 8 MiB was the sweet spot on real storage for ovirt-imageio.
        "buffer_size_bytes": 8 * MiB,
        # All transfer buffers together stay within this; concurrent
        # transfers get smaller buffers (see imaged.buffers).
        "buffer_budget_bytes": 16 * MiB,
        "max_readers": 8,
        "max_writers": 8,
        # Concurrent connections using one session.
        "max_connections_per_session": 32,
        # Idle client connections are dropped after this; a session's own
        # inactivity_timeout overrides it.
        "inactivity_timeout_s": 60,
        # Open files with O_DIRECT where the file system allows it.
        "direct_io": True,
        # When not empty, session urls must be inside one of these
        # directories (after resolving symlinks).
        "allowed_dirs": [],
        # Most extents in one answer to a windowed extents request (with
        # start or length): the answer is then a prefix of the window.
        "max_extents": 100000,
    },
    "sessions": {
        "reaper_interval_s": 1.0,
        "remove_timeout_s": 60.0,
        # Cap on control API request bodies.
        "max_body_bytes": 64 * 1024,
    },
    "progress": {
        # GET /progress/{id} as server-sent events: one event this often.
        "event_interval_s": 1.0,
    },
    "threads": {
        # Threads doing blocking disk syscalls for all sessions.
        "pool_size": 32,
        # Pool threads one session may hold, so a session on dead storage
        # cannot stall the others.
        "per_session": 8,
    },
    "server": {
        # Most concurrent connections per listener.
        "max_connections": 1000,
        # Seconds to let running requests finish on shutdown.
        "stop_timeout_s": 5.0,
        # A request line and headers must arrive within this many seconds
        # of their first byte, and a TLS handshake within this many seconds
        # of the connection.
        "header_timeout_s": 30.0,
        # TCP connections (tls and tcp listeners) keep at most about this
        # much unsent data in the kernel (TCP_NOTSENT_LOWAT; 0: the
        # kernel's default, as much as the send buffer takes). A fast sender
        # to a slower client otherwise queues megabytes that the client's
        # own ACKs then push out, in the client's time: on loopback curl
        # spent 0.43-0.56 s of system time per 2 GiB HTTPS GET instead of
        # 0.61-1.03 s, and downloads ran 3-25% faster (docs/benchmarks.md).
        "tcp_notsent_lowat_bytes": 128 * KiB,
    },
    "proxy": {
        # CA bundle verifying the certificates of the hosts a proxy session
        # relays to; null: the system's CAs.
        "ca_file": None,
        # When the host of a proxy session is this machine, relay through
        # the unix socket it reports in OPTIONS instead of TLS (as
        # ovirt-imageio's proxy does): no encryption on the second leg.
        "use_unix_socket": True,
        # As tls.write_buffer_bytes, for request bodies sent to hosts over
        # TLS (0: a write per 16 KiB record).
        "write_buffer_bytes": 256 * KiB,
        # Connecting to a host (TCP and TLS handshake) must take less.
        "connect_timeout_s": 10.0,
        # A host that sends nothing for this long fails the request (502).
        "timeout_s": 60.0,
    },
    "tokens": {
        # The engine's public keys (PEM text or paths of PEM files; public
        # keys or certificates): Ed25519/Ed448 (EdDSA), EC P-256/384/521
        # (ES256/384/512), RSA (RS256/384/512, PS256/384/512). Empty: no
        # token is accepted.
        "public_keys": [],
        # When set, tokens must carry this `iss`.
        "issuer": None,
        # Clock skew allowed when checking exp and nbf.
        "leeway_s": 0,
        # Verified token sessions kept at once (each is a session).
        "max_sessions": 10000,
    },
    "logging": {
        "level": "INFO",
        # null: stderr (journald under systemd).
        "file": None,
    },
}

LISTENER_DEFAULTS = {
    "name": None,
    "kind": None,
    "host": "::",
    "port": None,
    "path": None,
    "apps": None,
    # Mounting `sessions` on a TCP listener that is not loopback is refused
    # unless this is set.
    "allow_remote_control": False,
    # Unix socket file permissions (ignored for abstract sockets).
    "mode": 0o660,
    "group": None,
}


class ConfigError(Exception):
    """The configuration is invalid; the message names the key path."""


def default_config_dir(path):
    """The drop-in directory of the main config file `path`."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), "conf.d")


def load(path, config_dir=None):
    """
    Load the YAML config file `path` merged with the drop-ins of
    `config_dir` (default: default_config_dir(path), which need not
    exist), and validate it; returns a plain dict.

    Errors name the file and the key path. Relative paths in any file are
    relative to the directory of the main file.
    """
    explicit = config_dir is not None
    if config_dir is None:
        config_dir = default_config_dir(path)
    raw = _read(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <top>: expected a mapping, got {_show(raw)}")
    origins = {}
    _note_origins(raw, (), path, origins)
    for drop_in in drop_ins(config_dir, explicit):
        extra = _read(drop_in)
        if extra is None:
            continue
        if not isinstance(extra, dict):
            raise ConfigError(f"{drop_in}: <top>: expected a mapping, got {_show(extra)}")
        raw = merge(raw, extra)
        _note_origins(extra, (), drop_in, origins)
    base = os.path.dirname(os.path.abspath(path))
    try:
        return validate(raw, base_dir=base)
    except ConfigError as e:
        raise ConfigError(f"{_origin_of(str(e), origins, path)}: {e}") from None


def drop_ins(config_dir, must_exist=False):
    """The `*.yaml` files of `config_dir` in name order."""
    if not os.path.isdir(config_dir):
        if must_exist:
            raise ConfigError(f"{config_dir}: not a directory")
        return []
    return sorted(glob.glob(os.path.join(glob.escape(config_dir), "*.yaml")))


def _read(path):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def merge(base, extra):
    """
    `extra` merged over `base`: mappings key by key, lists and other values
    replaced. A null where `base` has a mapping (a section whose keys are
    all commented out) changes nothing.
    """
    result = dict(base)
    for key, value in extra.items():
        old = result.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            result[key] = merge(old, value)
        elif isinstance(old, dict) and value is None:
            continue
        else:
            result[key] = copy.deepcopy(value)
    return result


def _note_origins(raw, prefix, path, origins):
    # Which file set each key path last; a list belongs to one file.
    for key, value in raw.items():
        where = prefix + (str(key),)
        if isinstance(value, dict):
            origins.setdefault(where, path)
            _note_origins(value, where, path, origins)
        elif value is not None or where not in origins:
            origins[where] = path


_KEY_PATH_PART = re.compile(r"[^.\[]+")


def _origin_of(message, origins, default):
    """The file that set the key path an error message starts with."""
    key_path = message.split(": ", 1)[0]
    parts = tuple(_KEY_PATH_PART.findall(key_path.split("[", 1)[0]))
    for n in range(len(parts), 0, -1):
        if parts[:n] in origins:
            return origins[parts[:n]]
    return default


def dump(cfg):
    """
    The effective config `cfg` as YAML, in the order of DEFAULTS; load()
    takes it back unchanged.
    """
    cfg = copy.deepcopy(cfg)
    for lst in cfg["listeners"]:
        # As people write file modes (load() reads the string as octal).
        lst["mode"] = f"0{lst['mode']:o}"
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False,
                          allow_unicode=True)


def validate(raw, base_dir="."):
    """
    Merge `raw` over the defaults and validate every value.

    Relative file paths are resolved against `base_dir` (the directory of the
    config file), so a lab config can live with its state directory.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"<top>: expected a mapping, got {_show(raw)}")
    cfg = copy.deepcopy(DEFAULTS)
    for section, value in raw.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{section}: unknown section")
        if section == "listeners":
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping, got {_show(value)}")
        for key, v in value.items():
            if key not in DEFAULTS[section]:
                raise ConfigError(f"{section}.{key}: unknown key")
            cfg[section][key] = v

    _check_tls(cfg["tls"], base_dir)
    _check_images(cfg["images"], base_dir)
    _check_sessions(cfg["sessions"])
    _number("progress.event_interval_s", cfg["progress"]["event_interval_s"], 0.05, 3600)
    _check_threads(cfg["threads"])
    _check_server(cfg["server"])
    _check_proxy(cfg["proxy"], base_dir)
    _check_tokens(cfg["tokens"], base_dir)
    _check_logging(cfg["logging"], base_dir)
    cfg["listeners"] = _check_listeners(raw.get("listeners"), base_dir)
    return cfg


# Value checkers. Each returns the (possibly normalized) value or raises.

def _show(value):
    return repr(value)


def _int(key, value, lo=None, hi=None):
    return _in_range(key, value, int, "an integer", lo, hi)


def _number(key, value, lo=None, hi=None):
    return _in_range(key, value, (int, float), "a number", lo, hi)


def _in_range(key, value, types, what, lo, hi):
    # bool is an int to Python, never to a config reader.
    if isinstance(value, bool) or not isinstance(value, types) \
            or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}: expected {_range_text(what, lo, hi)}, "
                          f"got {_show(value)}")
    return value


def _range_text(what, lo, hi):
    if lo is not None and hi is not None:
        return f"{what} {lo}-{hi}"
    if lo is not None:
        return f"{what} >= {lo}"
    return what


def _mode(key, value):
    # YAML 1.1 reads 0660 as octal; "0o660" and "660" strings are octal too.
    if isinstance(value, str):
        text = value[2:] if value.lower().startswith("0o") else value
        try:
            value = int(text, 8)
        except ValueError:
            raise ConfigError(f"{key}: expected an octal file mode like 0660, "
                              f"got {value!r}") from None
    return _int(key, value, 0, 0o777)


def _bool(key, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    return value


def _str(key, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
    return value


def _path(key, value, base_dir, optional=False):
    value = _str(key, value, optional=optional)
    if value is None:
        return None
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, "
                          f"got {_show(value)}")
    return value


def _check_tls(tls, base_dir):
    for key in ("cert_file", "key_file"):
        tls[key] = _path(f"tls.{key}", tls[key], base_dir)
    tls["ca_file"] = _path("tls.ca_file", tls["ca_file"], base_dir, optional=True)
    _bool("tls.verify_clients", tls["verify_clients"])
    _bool("tls.prefer_aes128_gcm", tls["prefer_aes128_gcm"])
    # OpenSSL needs room for one whole record (16 KiB and its overhead).
    if tls["read_buffer_bytes"]:
        _int("tls.read_buffer_bytes", tls["read_buffer_bytes"], 32 * KiB, 16 * MiB)
    if tls["write_buffer_bytes"]:
        _int("tls.write_buffer_bytes", tls["write_buffer_bytes"], 32 * KiB, 16 * MiB)
    if tls["verify_clients"] and not tls["ca_file"]:
        raise ConfigError("tls.verify_clients: needs tls.ca_file to verify against")


def _check_images(images, base_dir):
    size = _int("images.buffer_size_bytes", images["buffer_size_bytes"],
                4096, 64 * MiB)
    if size % 4096:
        raise ConfigError(f"images.buffer_size_bytes: expected a multiple of "
                          f"4096, got {size}")
    budget = _int("images.buffer_budget_bytes", images["buffer_budget_bytes"],
                  2 * 1024**2)
    if budget < 2 * size:
        raise ConfigError(f"images.buffer_budget_bytes: expected at least twice "
                          f"images.buffer_size_bytes ({2 * size}), got {budget}")
    _int("images.max_readers", images["max_readers"], 1, 1024)
    _int("images.max_writers", images["max_writers"], 1, 1024)
    _int("images.max_connections_per_session",
         images["max_connections_per_session"], 1, 100000)
    _number("images.inactivity_timeout_s", images["inactivity_timeout_s"], 1,
            MAX_TIMEOUT_S)
    _bool("images.direct_io", images["direct_io"])
    _int("images.max_extents", images["max_extents"], 1, 10**7)
    dirs = images["allowed_dirs"]
    if not isinstance(dirs, list):
        raise ConfigError(f"images.allowed_dirs: expected a list, got {_show(dirs)}")
    images["allowed_dirs"] = [
        os.path.realpath(_path(f"images.allowed_dirs[{i}]", d, base_dir))
        for i, d in enumerate(dirs)]


def _check_sessions(sessions):
    _number("sessions.reaper_interval_s", sessions["reaper_interval_s"], 0.01, 3600)
    _number("sessions.remove_timeout_s", sessions["remove_timeout_s"], 0, 3600)
    _int("sessions.max_body_bytes", sessions["max_body_bytes"], 1024, 16 * MiB)


def _check_threads(threads):
    _int("threads.pool_size", threads["pool_size"], 1, 1024)
    _int("threads.per_session", threads["per_session"], 1, 1024)


def _check_server(server):
    _int("server.max_connections", server["max_connections"], 1, 100000)
    _number("server.stop_timeout_s", server["stop_timeout_s"], 0, 600)
    # Also the deadline of a whole TLS handshake.
    _number("server.header_timeout_s", server["header_timeout_s"], 0.1, 3600)
    if server["tcp_notsent_lowat_bytes"]:
        # Below two loopback segments (2 x 64 KiB) corked responses stalled:
        # 96 KiB ran 0.6 GB/s where 128 KiB ran 1.1.
        _int("server.tcp_notsent_lowat_bytes", server["tcp_notsent_lowat_bytes"],
             128 * KiB, 64 * MiB)


def _check_proxy(proxy, base_dir):
    proxy["ca_file"] = _path("proxy.ca_file", proxy["ca_file"], base_dir, optional=True)
    _bool("proxy.use_unix_socket", proxy["use_unix_socket"])
    if proxy["write_buffer_bytes"]:
        _int("proxy.write_buffer_bytes", proxy["write_buffer_bytes"], 32 * KiB, 16 * MiB)
    _number("proxy.connect_timeout_s", proxy["connect_timeout_s"], 0.1, 3600)
    _number("proxy.timeout_s", proxy["timeout_s"], 0.1, 3600)


def _check_tokens(tokens, base_dir):
    keys = tokens["public_keys"]
    if not isinstance(keys, list):
        raise ConfigError(f"tokens.public_keys: expected a list, got {_show(keys)}")
    result = []
    for i, key in enumerate(keys):
        where = f"tokens.public_keys[{i}]"
        text = _str(where, key)
        if "-----BEGIN" not in text:
            text = _path(where, text, base_dir)
        result.append(text)
    tokens["public_keys"] = result
    tokens["issuer"] = _str("tokens.issuer", tokens["issuer"], optional=True)
    _number("tokens.leeway_s", tokens["leeway_s"], 0, 3600)
    _int("tokens.max_sessions", tokens["max_sessions"], 1, 10**6)
    if result:
        # Parse now: a bad key stops the start with the key path.
        from . import tokens as tokens_mod
        try:
            tokens_mod.load_keys(result)
        except tokens_mod.KeyError_ as e:
            raise ConfigError(f"tokens.public_keys[{e.index}]: {e}") from None


def _check_logging(logging_, base_dir):
    level = logging_["level"]
    if isinstance(level, str):
        level = level.upper()
    logging_["level"] = _choice("logging.level", level, LOG_LEVELS)
    logging_["file"] = _path("logging.file", logging_["file"], base_dir,
                             optional=True)


def _check_listeners(listeners, base_dir):
    if listeners is None:
        raise ConfigError("listeners: at least one listener is required")
    if not isinstance(listeners, list) or not listeners:
        raise ConfigError(f"listeners: expected a non-empty list, got {_show(listeners)}")
    result = []
    names = set()
    for i, raw in enumerate(listeners):
        where = f"listeners[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(raw)}")
        lst = dict(LISTENER_DEFAULTS)
        for key, value in raw.items():
            if key not in LISTENER_DEFAULTS:
                raise ConfigError(f"{where}.{key}: unknown key")
            lst[key] = value
        lst["name"] = _str(f"{where}.name", lst["name"] or f"listener{i}")
        if lst["name"] in names:
            raise ConfigError(f"{where}.name: duplicate listener name {lst['name']!r}")
        names.add(lst["name"])
        _check_listener(where, lst, base_dir)
        result.append(lst)
    return result


def _check_listener(where, lst, base_dir):
    kind = _choice(f"{where}.kind", lst["kind"], LISTENER_KINDS)
    apps = lst["apps"]
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{where}.apps: expected a non-empty list of "
                          f"{', '.join(APPS)}, got {_show(apps)}")
    for j, app in enumerate(apps):
        _choice(f"{where}.apps[{j}]", app, APPS)
    if len(set(apps)) != len(apps):
        raise ConfigError(f"{where}.apps: an app is listed twice")
    _bool(f"{where}.allow_remote_control", lst["allow_remote_control"])

    if kind == "unix":
        path = _str(f"{where}.path", lst["path"])
        # A leading NUL names an abstract socket: no file, nothing to resolve.
        if not path.startswith("\0"):
            lst["path"] = _path(f"{where}.path", path, base_dir)
        lst["mode"] = _mode(f"{where}.mode", lst["mode"])
        if lst["group"] is not None:
            group = lst["group"]
            if isinstance(group, int) and not isinstance(group, bool):
                pass
            else:
                _str(f"{where}.group", group)
                try:
                    grp.getgrnam(group)
                except KeyError:
                    raise ConfigError(f"{where}.group: no such group {group!r}") from None
        for key in ("port",):
            if lst[key] is not None:
                raise ConfigError(f"{where}.{key}: not valid for a unix listener")
    else:
        _str(f"{where}.host", lst["host"])
        _int(f"{where}.port", lst["port"], 0, 65535)
        if lst["path"] is not None:
            raise ConfigError(f"{where}.path: not valid for a {kind} listener")
        if ("sessions" in apps or "progress" in apps) \
                and not is_loopback(lst["host"]) \
                and not lst["allow_remote_control"]:
            raise ConfigError(
                f"{where}.apps: mounting the control apps (sessions, progress) "
                f"on non-loopback host {lst['host']!r} needs "
                f"allow_remote_control: true")


def is_loopback(host):
    """True if `host` only accepts connections from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")
