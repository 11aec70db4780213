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
    assert kinds["control"]["apps"] == ["sessions", "progress", "metrics"]
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
    ({"listeners": [dict(UNIX_CONTROL)], "tls": {"write_buffer_bytes": 1000}},
     "tls.write_buffer_bytes: expected an integer 32768-16777216, got 1000"),
    ({"listeners": [dict(UNIX_CONTROL)], "proxy": {"write_buffer_bytes": 32 * 1024**2}},
     "proxy.write_buffer_bytes: expected an integer 32768-16777216"),
    ({"listeners": [dict(UNIX_CONTROL)], "server": {"tcp_notsent_lowat_bytes": 64 * 1024}},
     "server.tcp_notsent_lowat_bytes: expected an integer 131072-67108864, got 65536"),
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


# Drop-ins (SPEC §10).

MAIN = """
tls: {cert_file: /etc/pki/imaged/cert.pem, key_file: /etc/pki/imaged/key.pem}
listeners:
  - {name: control, kind: unix, path: /run/x.sock, apps: [sessions, progress]}
images:
  max_readers: 4
  allowed_dirs: [/srv/a, /srv/b]
logging: {level: INFO}
"""


@pytest.fixture
def etc(tmp_path):
    main = tmp_path / "imaged.yaml"
    main.write_text(MAIN)
    (tmp_path / "conf.d").mkdir()
    return tmp_path


def test_drop_ins_merge_in_name_order(etc):
    d = etc / "conf.d"
    (d / "50-vdsm.yaml").write_text(
        "images: {max_writers: 2, allowed_dirs: [/rhev/data-center]}\n"
        "logging: {level: DEBUG}\n")
    (d / "90-admin.yaml").write_text("logging: {level: WARNING}\n")
    (d / "10-first.yaml").write_text("images: {max_writers: 7, max_readers: 3}\n")
    (d / "README").write_text("not yaml: [\n")
    (d / "notes.yml.bak").write_text("bogus: 1\n")
    cfg = config.load(str(etc / "imaged.yaml"))
    # Key by key: max_readers from 10-first, max_writers from 50-vdsm.
    assert cfg["images"]["max_readers"] == 3
    assert cfg["images"]["max_writers"] == 2
    # Lists are replaced, not appended.
    assert cfg["images"]["allowed_dirs"] == ["/rhev/data-center"]
    assert cfg["logging"]["level"] == "WARNING"
    # Untouched keys keep the main file's value.
    assert cfg["listeners"][0]["path"] == "/run/x.sock"


def test_listeners_list_is_replaced_by_a_drop_in(etc):
    (etc / "conf.d" / "x.yaml").write_text(
        "listeners:\n  - {name: only, kind: unix, path: /run/y.sock, apps: [images]}\n")
    cfg = config.load(str(etc / "imaged.yaml"))
    assert [lst["name"] for lst in cfg["listeners"]] == ["only"]


def test_null_section_in_a_drop_in_changes_nothing(etc):
    (etc / "conf.d" / "x.yaml").write_text("images:\n#  max_readers: 1\n")
    (etc / "conf.d" / "empty.yaml").write_text("# nothing yet\n")
    assert config.load(str(etc / "imaged.yaml"))["images"]["max_readers"] == 4


@pytest.mark.parametrize("text, key", [
    ("images: {max_readers: many}\n", "images.max_readers"),
    ("images: {colour: blue}\n", "images.colour"),
    ("bogus: {}\n", "bogus"),
    ("images: {allowed_dirs: [/ok, 7]}\n", "images.allowed_dirs[1]"),
    ("listeners:\n  - {name: r, kind: tls, port: abc, apps: [images]}\n",
     "listeners[0].port"),
    ("images: 5\n", "images"),
    ("- a list\n", "<top>"),
])
def test_drop_in_errors_name_the_file_and_key(etc, text, key):
    bad = etc / "conf.d" / "60-bad.yaml"
    (etc / "conf.d" / "10-good.yaml").write_text("images: {max_writers: 2}\n")
    bad.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(etc / "imaged.yaml"))
    assert str(e.value).startswith(f"{bad}: {key}"), str(e.value)


def test_main_file_errors_name_the_main_file(etc):
    (etc / "conf.d" / "10-good.yaml").write_text("images: {max_writers: 2}\n")
    (etc / "imaged.yaml").write_text(MAIN.replace("max_readers: 4", "max_readers: -1"))
    with pytest.raises(config.ConfigError) as e:
        config.load(str(etc / "imaged.yaml"))
    assert str(e.value).startswith(f"{etc / 'imaged.yaml'}: images.max_readers")


def test_invalid_yaml_in_a_drop_in_names_the_file(etc):
    bad = etc / "conf.d" / "x.yaml"
    bad.write_text("images: {max_readers: [\n")
    with pytest.raises(config.ConfigError, match=f"^{bad}: invalid YAML"):
        config.load(str(etc / "imaged.yaml"))


def test_explicit_config_dir(etc, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    (other / "a.yaml").write_text("images: {max_readers: 9}\n")
    (etc / "conf.d" / "a.yaml").write_text("images: {max_readers: 1}\n")
    cfg = config.load(str(etc / "imaged.yaml"), config_dir=str(other))
    assert cfg["images"]["max_readers"] == 9
    with pytest.raises(config.ConfigError, match="no-such-dir: not a directory"):
        config.load(str(etc / "imaged.yaml"), config_dir=str(other / "no-such-dir"))


def test_missing_default_config_dir_is_fine(tmp_path):
    (tmp_path / "imaged.yaml").write_text(MAIN)
    assert config.load(str(tmp_path / "imaged.yaml"))["images"]["max_readers"] == 4


def test_dump_loads_back_unchanged(etc):
    (etc / "conf.d" / "a.yaml").write_text("images: {max_readers: 2}\n")
    cfg = config.load(str(etc / "imaged.yaml"))
    out = etc / "shown.yaml"
    out.write_text(config.dump(cfg))
    assert config.load(str(out), config_dir=str(etc / "conf.d")) == cfg
    assert "mode: '0660'" in config.dump(cfg)


def test_shipped_config_dir_has_no_drop_ins():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(root, "config", "conf.d")
    assert os.path.isfile(os.path.join(d, "README"))
    assert config.drop_ins(d) == []
