import os

import pytest

from imaged import config

UNIX_CONTROL = {"name": "control", "kind": "unix", "path": "/run/x.sock",
                "apps": ["sessions", "progress"]}


def valid(**sections):
    raw = {"listeners": [dict(UNIX_CONTROL)]}
    raw.update(sections)
    return config.validate(raw)


def error_of(raw, base_dir="/base"):
    with pytest.raises(config.ConfigError) as e:
        config.validate(raw, base_dir=base_dir)
    return str(e.value)


def test_defaults_fill_every_section():
    cfg = valid()
    assert cfg["images"]["buffer_size_bytes"] == 8 * 1024**2
    assert cfg["images"]["max_readers"] == 8
    assert cfg["sessions"]["reaper_interval_s"] == 1.0
    assert cfg["sessions"]["remove_timeout_s"] == 60.0
    assert cfg["logging"]["level"] == "INFO"
    assert cfg["listeners"][0]["mode"] == 0o660


def test_shipped_config_is_valid():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config.load(os.path.join(root, "config", "imaged.yaml"))
    kinds = {lst["name"]: lst for lst in cfg["listeners"]}
    assert kinds["remote"]["kind"] == "tls"
    assert kinds["remote"]["port"] == 54322
    assert kinds["remote"]["host"] == "::"
    assert kinds["local"]["path"] == "\0/org/imaged"
    assert kinds["control"]["path"] == "/run/imaged/control.sock"
    assert kinds["control"]["apps"] == ["sessions", "progress"]
    assert cfg["tls"]["cert_file"] == "/etc/pki/imaged/cert.pem"


def test_lab_config_paths_are_relative_to_the_file():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config.load(os.path.join(root, "config", "lab.yaml"))
    assert cfg["tls"]["cert_file"] == os.path.join(root, "lab", "cert.pem")
    control = [lst for lst in cfg["listeners"] if "sessions" in lst["apps"]][0]
    assert control["path"] == os.path.join(root, "lab", "control.sock")


def test_bad_port_names_the_key_path():
    raw = {"listeners": [dict(UNIX_CONTROL),
                         {"name": "r", "kind": "tls", "port": "abc", "apps": ["images"]}]}
    assert error_of(raw) == \
        "listeners[1].port: expected an integer 0-65535, got 'abc'"


@pytest.mark.parametrize("raw, message", [
    ({"listeners": [], "bogus": {}}, "bogus: unknown section"),
    ({"listeners": [dict(UNIX_CONTROL)], "images": {"nope": 1}},
     "images.nope: unknown key"),
    ({"listeners": [dict(UNIX_CONTROL, extra=1)]}, "listeners[0].extra: unknown key"),
    ({"listeners": [dict(UNIX_CONTROL, kind="udp")]}, "listeners[0].kind: expected one of"),
    ({"listeners": [dict(UNIX_CONTROL, apps=["web"])]}, "listeners[0].apps[0]: expected one of"),
    ({"listeners": [dict(UNIX_CONTROL, apps=[])]}, "listeners[0].apps: expected a non-empty list"),
    ({"listeners": [dict(UNIX_CONTROL, mode="rw")]}, "listeners[0].mode: expected an octal"),
    ({"listeners": [dict(UNIX_CONTROL, group="no-such-group-xyz")]},
     "listeners[0].group: no such group"),
    ({"listeners": [dict(UNIX_CONTROL), dict(UNIX_CONTROL)]},
     "listeners[1].name: duplicate listener name"),
    ({}, "listeners: at least one listener is required"),
    ({"listeners": "x"}, "listeners: expected a non-empty list"),
    ({"listeners": [dict(UNIX_CONTROL)], "images": {"buffer_size_bytes": 1000}},
     "images.buffer_size_bytes: expected an integer 4096-67108864, got 1000"),
    ({"listeners": [dict(UNIX_CONTROL)], "images": {"buffer_size_bytes": 5000}},
     "images.buffer_size_bytes: expected a multiple of 4096"),
    ({"listeners": [dict(UNIX_CONTROL)], "images": {"max_readers": True}},
     "images.max_readers: expected an integer"),
    ({"listeners": [dict(UNIX_CONTROL)], "sessions": {"reaper_interval_s": "1s"}},
     "sessions.reaper_interval_s: expected a number"),
    ({"listeners": [dict(UNIX_CONTROL)], "logging": {"level": "LOUD"}},
     "logging.level: expected one of"),
    ({"listeners": [dict(UNIX_CONTROL)], "tls": {"verify_clients": True}},
     "tls.verify_clients: needs tls.ca_file"),
    ({"listeners": [dict(UNIX_CONTROL)], "images": "big"},
     "images: expected a mapping"),
])
def test_invalid_values_are_refused(raw, message):
    assert error_of(raw).startswith(message)


def test_control_on_remote_tcp_needs_opt_in():
    lst = {"name": "c", "kind": "tcp", "host": "0.0.0.0", "port": 1, "apps": ["sessions"]}
    assert "allow_remote_control" in error_of({"listeners": [lst]})
    cfg = config.validate({"listeners": [dict(lst, allow_remote_control=True)]})
    assert cfg["listeners"][0]["allow_remote_control"] is True


def test_control_on_loopback_tcp_is_fine():
    lst = {"name": "c", "kind": "tcp", "host": "127.0.0.1", "port": 1, "apps": ["sessions"]}
    config.validate({"listeners": [lst]})


def test_mode_accepts_octal_strings():
    cfg = valid(listeners=[dict(UNIX_CONTROL, mode="0o640")])
    assert cfg["listeners"][0]["mode"] == 0o640


def test_abstract_socket_path_is_kept():
    cfg = valid(listeners=[dict(UNIX_CONTROL, path="\0/org/imaged")])
    assert cfg["listeners"][0]["path"] == "\0/org/imaged"


def test_load_reports_yaml_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("listeners: [\n")
    with pytest.raises(config.ConfigError, match="invalid YAML"):
        config.load(str(p))


def test_load_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.yaml"))
