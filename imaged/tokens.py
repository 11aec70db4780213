"""
Signed access tokens: the engine signs, imaged only verifies.

A request may carry `Authorization: Bearer TOKEN` (or the token alone, see
bearer()) instead of naming a session the host agent added over the control
API. TOKEN is a JWS (JWT)
signed by the engine with a private key whose public half is configured in
`tokens.public_keys`. Its claims:

    sub      the session id of the request's URL (compared in constant time)
    exp      expiry (seconds since the epoch), required
    nbf      not before, optional
    iss      required and checked when `tokens.issuer` is set
    session  the session fields of the control API (url, size, ops, ...),
             validated exactly like a session added over the control API;
             `timeout` may be left out: the session lasts until `exp`. The
             url must be a host's images URL (https://, http:// for labs):
             a token makes this daemon a proxy, never opens its own files.

A valid token authorizes exactly that session until `exp`. Verification is
PyJWT's, with the algorithms each configured key type allows and no other:
never `none`, never an HMAC algorithm with a public key (the algorithm
confusion attack). Every failure is errors.Forbidden with a short message;
the token itself never appears in a message or a log line.

Verified tokens are remembered by a digest of the token (not the token), so
that a browser sending the same token with each 8 MiB PUT pays one
signature check, not one per request; the session made from a token is
kept in the registry (imaged.sessions.Registry.add_token_session), expires
at `exp` and is reaped like any session.
"""

import hashlib
import hmac
import logging
import time
import urllib.parse

from . import errors
from . import sessions

log = logging.getLogger("tokens")

# The url schemes a token's session may have: the proxy role's (see
# imaged.backends.http).
PROXY_SCHEMES = ("https", "http")

# An Authorization header longer than this is refused before parsing; a
# token with a full session claim and an RSA-4096 signature is ~1.5 KiB.
MAX_TOKEN_BYTES = 16 * 1024

# Algorithms allowed per key type; everything else is refused, whatever the
# token header says.
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


class KeyError_(ValueError):
    """A configured public key is unusable; `index` is its place in the list."""

    def __init__(self, index, message):
        super().__init__(message)
        self.index = index


class PublicKey:
    """A configured verification key and the algorithms it may verify."""

    def __init__(self, key, algorithms, description):
        self.key = key
        self.algorithms = algorithms
        self.description = description


def load_keys(entries):
    """
    Parse `tokens.public_keys`: PEM text or paths of PEM files, each a
    public key or a certificate. Returns a list of PublicKey; raises
    KeyError_ naming the entry.
    """
    return [_load_key(i, entry) for i, entry in enumerate(entries)]


def _load_key(index, entry):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if "-----BEGIN" in entry:
        data = entry.encode("ascii", "replace")
    else:
        try:
            with open(entry, "rb") as f:
                data = f.read(1024**2)
        except OSError as e:
            raise KeyError_(index, f"cannot read {entry}: {e.strerror}") from None
    if b"PRIVATE KEY-----" in data:
        # A private key has no business on a host: only the engine signs.
        raise KeyError_(index, "a private key; configure the public key or "
                               "certificate instead")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyError_(index, f"not a PEM public key or certificate: {e}") from None

    if isinstance(key, ed25519.Ed25519PublicKey):
        return PublicKey(key, ("EdDSA",), "Ed25519")
    if isinstance(key, ed448.Ed448PublicKey):
        return PublicKey(key, ("EdDSA",), "Ed448")
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise KeyError_(index, f"unsupported elliptic curve {key.curve.name}")
        return PublicKey(key, (alg,), f"EC {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise KeyError_(index, f"RSA key of {key.key_size} bits; at least 2048 needed")
        return PublicKey(key, _RSA_ALGORITHMS, f"RSA {key.key_size}")
    raise KeyError_(index, f"unsupported key type {type(key).__name__}")


def bearer(header):
    """
    The token of an `Authorization` header value, or None without a header.

    `Bearer TOKEN`, or the token alone: ovirt-imageio's proxy took the
    engine's signed ticket as the whole header value, and the engine's web
    UI sent it so (`Authorization: <signed ticket>`); a client written for
    that convention only has to send our token instead. A bare value counts
    as a token only in the JWS compact form (three dot-separated parts);
    other schemes (Basic, ...) are refused (403). Either way the token is
    verified the same.
    """
    if header is None:
        return None
    value = header.strip()
    scheme, sep, token = value.partition(" ")
    if sep:
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
    elif value.count(".") == 2:
        return value
    raise errors.Forbidden("unsupported Authorization: expected 'Bearer TOKEN' or the token")


class Verifier:
    """
    Turns tokens into sessions of `registry` (an imaged.sessions.Registry),
    per the `tokens` section of the config.
    """

    def __init__(self, cfg, registry, clock=time.time):
        self._registry = registry
        self._keys = load_keys(cfg["public_keys"]) if cfg["public_keys"] else []
        self._issuer = cfg["issuer"]
        self._leeway_s = cfg["leeway_s"]
        self._max_sessions = cfg["max_sessions"]
        self._clock = clock
        if self._keys:
            # Imported only where tokens are used: PyJWT and cryptography
            # cost a daemon that never sees a token ~8 MiB of memory.
            import jwt
            self._jwt = jwt
            log.info("accepting tokens signed by %s",
                     ", ".join(k.description for k in self._keys))

    @property
    def enabled(self):
        return bool(self._keys)

    def authorize(self, token, session_id, op):
        """The session `token` grants for `session_id`, if it allows `op`."""
        if not self._keys:
            raise errors.Forbidden("signed tokens are not accepted by this server")
        if len(token) > MAX_TOKEN_BYTES:
            raise errors.Forbidden("token too large")
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        session = self._registry.token_session(key)
        if session is None:
            claims = self.verify(token)
            _check_sub(claims["sub"], session_id)
            spec = self._session_spec(claims)
            session = self._registry.add_token_session(
                key, spec, self._max_sessions)
        else:
            _check_sub(session.id, session_id)
        session.authorize(op)
        return session

    def verify(self, token):
        """The claims of a valid token; Forbidden with the reason otherwise."""
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise errors.Forbidden("malformed token") from None
        alg = header.get("alg")
        candidates = [k for k in self._keys if isinstance(alg, str) and alg in k.algorithms]
        if not candidates:
            show = alg if isinstance(alg, str) and alg.isprintable() else "?"
            raise errors.Forbidden(f"token algorithm {show[:16]!r} is not accepted")
        required = ["exp", "sub"] + (["iss"] if self._issuer else [])
        for k in candidates:
            try:
                return jwt.decode(
                    token, k.key, algorithms=[alg], issuer=self._issuer,
                    leeway=self._leeway_s, options={"require": required})
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise errors.Forbidden("token expired") from None
            except jwt.ImmatureSignatureError:
                raise errors.Forbidden("token is not valid yet (nbf)") from None
            except jwt.InvalidIssuerError:
                raise errors.Forbidden("token issuer is not accepted") from None
            except jwt.MissingRequiredClaimError as e:
                raise errors.Forbidden(f"token lacks the {e.claim!r} claim") from None
            except jwt.InvalidTokenError as e:
                # Texts of PyJWT describe the claim, never echo the token.
                raise errors.Forbidden(f"invalid token: {str(e)[:80]}") from None
        raise errors.Forbidden("token signature does not match any accepted key")

    def _session_spec(self, claims):
        body = claims.get("session")
        if not isinstance(body, dict):
            raise errors.Forbidden("invalid token: the 'session' claim must be an object")
        ttl = claims["exp"] - self._clock() + self._leeway_s
        if ttl <= 0:
            raise errors.Forbidden("token expired")
        body = dict(body)
        # The token decides how long the session lasts.
        body["timeout"] = max(int(ttl), 1)
        try:
            spec = sessions.parse_spec(claims["sub"], body)
        except errors.BadRequest as e:
            raise errors.Forbidden(f"invalid token session: {e.message}") from None
        if urllib.parse.urlsplit(spec["url"]).scheme not in PROXY_SCHEMES:
            # A token relays to a host; it never opens an image of this
            # machine (file://, NBD), which only the host agent prepares and
            # adds over the control API, under images.allowed_dirs.
            raise errors.Forbidden(
                "invalid token session: the url must be a host's images URL "
                "(https://HOST:PORT/images/ID)")
        # Sub-second precision: the session ends when the token does.
        spec["timeout"] = ttl
        return spec


def _check_sub(sub, session_id):
    if not isinstance(sub, str) or not hmac.compare_digest(
            sub.encode("utf-8", "surrogateescape"),
            session_id.encode("utf-8", "surrogateescape")):
        raise errors.Forbidden("token is for another session")


__all__ = ["Verifier", "load_keys", "bearer", "MAX_TOKEN_BYTES"]
