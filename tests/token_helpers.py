"""
Keys and tokens for the signed-token tests: real keys made with
cryptography, tokens signed by PyJWT the way an engine would, and the
forgeries an attacker would try.
"""

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: F401 (rsa: tests)


def generate(kind):
    """A private key of `kind` (EdDSA, ES256 or RS256)."""
    if kind == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def public_pem(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(private_key):
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


def claims(sub, session, exp_in=300, **extra):
    now = int(time.time())
    c = {"sub": sub, "exp": now + exp_in, "iat": now, "session": session}
    c.update(extra)
    return c


def sign(private_key, alg, payload, headers=None):
    return jwt.encode(payload, private_key, algorithm=alg, headers=headers)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload):
    """alg none: no signature at all."""
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(payload).encode())}."


def hs256_with_public_key(public_key_pem, payload):
    """The algorithm confusion attack: HMAC keyed with the public key PEM."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(public_key_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256)
    return f"{head}.{body}.{b64(mac.digest())}"


def tampered(token, **changes):
    """The payload changed after signing: the signature no longer matches."""
    head, body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    return f"{head}.{b64(json.dumps(payload).encode())}.{sig}"


def new_id():
    return str(uuid.uuid4())
