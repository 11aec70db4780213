"""
imaged.tokens: real keys, tokens signed by PyJWT as an engine signs them,
and every forgery of the issue refused with 403 and a reason.
"""

import time

import pytest

from imaged import config
from imaged import errors
from imaged import sessions
from imaged import tokens

from tests import token_helpers as th

SESSION = {"url": "https://host.example.com:54322/images/host-ticket-1",
           "size": 1024**3, "ops": ["read", "write"], "transfer_id": "t-1"}


def verifier(*public_keys, issuer=None, leeway_s=0, max_sessions=100):
    cfg = config.validate({
        "listeners": [{"kind": "unix", "path": "/tmp/x.sock", "apps": ["images"]}],
        "tokens": {"public_keys": list(public_keys), "issuer": issuer,
                   "leeway_s": leeway_s, "max_sessions": max_sessions}})
    registry = sessions.Registry()
    return tokens.Verifier(cfg["tokens"], registry), registry


@pytest.fixture(scope="module")
def keys():
    return {kind: th.generate(kind) for kind in ("EdDSA", "ES256", "RS256")}


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_valid_token_grants_its_session(keys, alg):
    v, registry = verifier(th.public_pem(keys[alg]))
    sid = th.new_id()
    token = th.sign(keys[alg], alg, th.claims(sid, SESSION, exp_in=120))
    session = v.authorize(token, sid, "write")
    assert session.id == sid
    assert session.url == SESSION["url"]
    assert session.size == SESSION["size"]
    assert session.ops == ["read", "write"]
    assert session.name == "t-1"
    # It lasts until exp, not longer.
    assert 110 < session.expires - time.monotonic() <= 121
    # Not reachable by its id alone: the token is the authorization.
    with pytest.raises(errors.Forbidden):
        registry.authorize(sid, "read")
    # The same token again: the same session, no new signature check needed.
    assert v.authorize(token, sid, "read") is session


def test_certificate_as_key(keys, tmp_path):
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = keys["ES256"]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "engine")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives.serialization import Encoding
    path = tmp_path / "engine.crt"
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    v, _ = verifier(str(path))
    sid = th.new_id()
    assert v.authorize(th.sign(key, "ES256", th.claims(sid, SESSION)), sid, "read").id == sid


def test_several_keys(keys):
    v, _ = verifier(*(th.public_pem(k) for k in keys.values()))
    for alg, key in keys.items():
        sid = th.new_id()
        assert v.authorize(th.sign(key, alg, th.claims(sid, SESSION)), sid, "read").id == sid


def forgeries(keys):
    """(name, make(sid) -> token, expected message part)."""
    good = keys["EdDSA"]
    other = th.generate("EdDSA")
    pem = th.public_pem(good)
    return [
        ("bad signature", lambda sid: th.tampered(
            th.sign(good, "EdDSA", th.claims(sid, dict(SESSION, ops=["read"]))),
            session=SESSION), "signature"),
        ("unknown key", lambda sid: th.sign(other, "EdDSA", th.claims(sid, SESSION)),
         "signature"),
        ("alg none", lambda sid: th.unsigned(th.claims(sid, SESSION)), "algorithm"),
        ("HS256 with the public key", lambda sid: th.hs256_with_public_key(
            pem, th.claims(sid, SESSION)), "algorithm"),
        ("RS256 when the key is Ed25519", lambda sid: th.sign(
            keys["RS256"], "RS256", th.claims(sid, SESSION)), "algorithm"),
        ("wrong sub", lambda sid: th.sign(good, "EdDSA", th.claims(th.new_id(), SESSION)),
         "another session"),
        ("expired", lambda sid: th.sign(good, "EdDSA", th.claims(sid, SESSION, exp_in=-5)),
         "expired"),
        ("not yet valid", lambda sid: th.sign(good, "EdDSA", th.claims(
            sid, SESSION, nbf=int(time.time()) + 300)), "not valid yet"),
        ("no exp", lambda sid: th.sign(good, "EdDSA", {"sub": sid, "session": SESSION}),
         "exp"),
        ("no session claim", lambda sid: th.sign(good, "EdDSA", th.claims(sid, None)),
         "session"),
        ("session claim not an object", lambda sid: th.sign(
            good, "EdDSA", th.claims(sid, ["read"])), "session"),
        ("session with a bad url", lambda sid: th.sign(good, "EdDSA", th.claims(
            sid, dict(SESSION, url="ftp://x/images/y"))), "url"),
        ("session with bad ops", lambda sid: th.sign(good, "EdDSA", th.claims(
            sid, dict(SESSION, ops=["delete"]))), "ops"),
        ("session without size", lambda sid: th.sign(good, "EdDSA", th.claims(
            sid, {k: v for k, v in SESSION.items() if k != "size"})), "size"),
        ("session uuid differs", lambda sid: th.sign(good, "EdDSA", th.claims(
            sid, dict(SESSION, uuid=th.new_id()))), "uuid"),
        ("garbage", lambda sid: "not.a.token", "malformed"),
        ("too large", lambda sid: "x" * (tokens.MAX_TOKEN_BYTES + 1), "too large"),
    ]


def test_forgeries_are_refused(keys):
    v, registry = verifier(th.public_pem(keys["EdDSA"]))
    for name, make, why in forgeries(keys):
        sid = th.new_id()
        with pytest.raises(errors.Forbidden) as e:
            v.authorize(make(sid), sid, "read")
        assert why in e.value.message, name
    assert registry._token_sessions == {}


def test_verified_token_still_checks_sub(keys):
    v, _ = verifier(th.public_pem(keys["EdDSA"]))
    sid = th.new_id()
    token = th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION))
    v.authorize(token, sid, "read")
    # A cached token is no key to other sessions.
    with pytest.raises(errors.Forbidden, match="another session"):
        v.authorize(token, th.new_id(), "read")


def test_read_only_token_does_not_write(keys):
    v, _ = verifier(th.public_pem(keys["ES256"]))
    sid = th.new_id()
    token = th.sign(keys["ES256"], "ES256", th.claims(sid, dict(SESSION, ops=["read"])))
    with pytest.raises(errors.Forbidden, match="does not allow write"):
        v.authorize(token, sid, "write")


def test_issuer(keys):
    v, _ = verifier(th.public_pem(keys["EdDSA"]), issuer="engine.example.com")
    sid = th.new_id()
    ok = th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION, iss="engine.example.com"))
    assert v.authorize(ok, sid, "read")
    for bad, why in ((th.claims(sid, SESSION, iss="evil"), "issuer"),
                     (th.claims(sid, SESSION), "iss")):
        with pytest.raises(errors.Forbidden, match=why):
            v.authorize(th.sign(keys["EdDSA"], "EdDSA", bad), sid, "read")


def test_session_expires_with_the_token(keys):
    v, registry = verifier(th.public_pem(keys["EdDSA"]))
    sid = th.new_id()
    token = th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION, exp_in=2))
    session = v.authorize(token, sid, "read")
    deadline = time.monotonic() + 10
    while not session.expired() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.reap() == 1
    assert session.canceled
    with pytest.raises(errors.Forbidden, match="expired"):
        v.authorize(token, sid, "read")


def test_no_keys_no_tokens(keys):
    v, _ = verifier()
    sid = th.new_id()
    with pytest.raises(errors.Forbidden, match="not accepted"):
        v.authorize(th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION)), sid, "read")


def test_max_sessions(keys):
    v, _ = verifier(th.public_pem(keys["EdDSA"]), max_sessions=2)
    for _ in range(2):
        sid = th.new_id()
        v.authorize(th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION)), sid, "read")
    sid = th.new_id()
    with pytest.raises(errors.ServiceUnavailable):
        v.authorize(th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, SESSION)), sid, "read")


@pytest.mark.parametrize("header, token", [
    (None, None),
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer  abc.def.ghi ", "abc.def.ghi"),
    # The token alone, as ovirt-imageio's proxy took its signed ticket.
    ("abc.def.ghi", "abc.def.ghi"),
    (" abc.def.ghi ", "abc.def.ghi"),
])
def test_bearer(header, token):
    assert tokens.bearer(header) == token


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Basic a.b.c", "Bearer",
                                    "Bearer  ", "abc", "a.b", "a.b.c.d", ""])
def test_bearer_other_schemes(header):
    with pytest.raises(errors.Forbidden):
        tokens.bearer(header)


@pytest.mark.parametrize("url", ["file:///var/tmp/disk.raw", "nbd:unix:/run/disk.sock",
                                 "nbd+unix:///?socket=/run/disk.sock",
                                 "nbd://127.0.0.1:10809/disk"])
def test_token_only_relays_to_a_host(keys, url):
    """A token never opens an image of the daemon that verifies it."""
    v, registry = verifier(th.public_pem(keys["EdDSA"]))
    sid = th.new_id()
    token = th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, dict(SESSION, url=url)))
    with pytest.raises(errors.Forbidden) as e:
        v.authorize(token, sid, "read")
    assert "host's images URL" in e.value.message
    assert registry.token_sessions() == []
    # The lab form (plain HTTP to a host) is a relay too.
    sid = th.new_id()
    url = "http://host.example.com:54323/images/host-ticket-1"
    token = th.sign(keys["EdDSA"], "EdDSA", th.claims(sid, dict(SESSION, url=url)))
    assert v.authorize(token, sid, "read").url == url


def test_config_refuses_bad_keys(keys, tmp_path):
    base = {"listeners": [{"kind": "unix", "path": "/tmp/x.sock", "apps": ["images"]}]}
    for value, why in (
            (th.private_pem(keys["EdDSA"]), "private key"),
            ("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "PEM"),
            (str(tmp_path / "missing.pem"), "cannot read"),
            (th.public_pem(th.rsa.generate_private_key(65537, 1024)), "2048")):
        with pytest.raises(config.ConfigError, match=r"tokens.public_keys\[0\]: .*" + why):
            config.validate(dict(base, tokens={"public_keys": [value]}))
