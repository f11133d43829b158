"""RS256 beside ES256: per-key algorithms in one key set, and a token's ``alg`` pinned to its key's.

The key set decides the algorithm (``SigningKey.alg`` follows from the key material); a token's
header only names it, and a header ``alg`` that differs from the ``alg`` of the key its ``kid``
names is refused. ``tests/test_tokens.py`` holds the rules common to both algorithms (tried on
ES256); this file holds what RS256 adds, the mixed set of a migration, and a real server that
signs RS256.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tether.server import settings as settings_module
from tether.server.auth import signing_keys
from tether.server.auth.signing_keys import (
    MAX_KEYS,
    KeySet,
    KeySetError,
    SigningKey,
    load_or_create_key_file,
    rotate_key_file,
)
from tether.server.auth.tokens import AccessClaims, AccessTokens
from tether.server.settings import Settings, SettingsError

from tests.harness import ServerProcess
from tests.sync_client import auth_post, connect_sync, signin, signup
from tests.token_kit import (
    AUDIENCE,
    EXP,
    INVALID,
    ISSUER,
    NOW,
    access_tokens,
    b64,
    es256_signature,
    good_claims,
    json_bytes,
    refusal,
    unb64,
)

# ---------------------------------------------------------------------------------- helpers


def header_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(unb64(token.split(".")[0]))
    return value


def signing_input(alg: Any, kid: str) -> str:
    header = {"alg": alg, "typ": "at+jwt", "kid": kid}
    return f"{b64(json_bytes(header))}.{b64(json_bytes(good_claims()))}"


def rs256(private_key: rsa.RSAPrivateKey, message: str) -> bytes:
    return private_key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())


def issue(tokens: AccessTokens, user_id: str = "user-1") -> str:
    return tokens.issue(user_id=user_id, session_id="sess-1", now=NOW, expires_at=EXP)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def with_key(keyset: KeySet, private_key: Any, alg: str) -> str:
    """``keyset``'s JSON with its first key's material replaced (and its alg declared)."""
    doc = json.loads(keyset.to_json())
    doc["keys"][0]["alg"] = alg
    doc["keys"][0]["privateKey"] = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return json.dumps(doc)


# RSA key generation costs tens of milliseconds: one RS256 set for the module's read-only tests.
@pytest.fixture(scope="module")
def rs_set() -> KeySet:
    return KeySet.generate("RS256")


@pytest.fixture(scope="module")
def rs_key(rs_set: KeySet) -> SigningKey:
    return rs_set.signing_key


@pytest.fixture(scope="module")
def rs_tokens(rs_set: KeySet) -> AccessTokens:
    return access_tokens(rs_set)


@pytest.fixture(scope="module")
def mixed_set(rs_set: KeySet) -> KeySet:
    """A migration in progress: an RS256 signer in front of an older ES256 key."""
    return KeySet(
        keys=(rs_set.signing_key, KeySet.generate("ES256").signing_key),
        refresh_secret=rs_set.refresh_secret,
    )


# ---------------------------------------------------------------------------------- the key set


def test_rs256_set_is_created_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    created = load_or_create_key_file(path, "RS256")
    key = created.signing_key
    assert key.alg == "RS256"
    assert isinstance(key.private_key, rsa.RSAPrivateKey)
    assert key.private_key.key_size == 2048
    assert key.private_key.private_numbers().public_numbers.e == 65537
    doc = json.loads(path.read_text())
    assert doc["keys"][0]["alg"] == "RS256"
    again = load_or_create_key_file(path, "ES256")  # an existing set is read as it is
    assert [(k.kid, k.alg) for k in again.keys] == [(key.kid, "RS256")]
    assert again.signing_key.private_key.private_numbers() == key.private_key.private_numbers()


def test_default_algorithm_is_es256(tmp_path: Path) -> None:
    assert KeySet.generate().signing_key.alg == "ES256"
    assert load_or_create_key_file(tmp_path / "keys.json").signing_key.alg == "ES256"
    assert Settings.load(environ={}).signing_algorithm == "ES256"


def test_rotation_chooses_the_new_keys_algorithm_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first = load_or_create_key_file(path).signing_key
    rs_kid = rotate_key_file(path, "RS256")
    es_kid = rotate_key_file(path, "ES256")
    keys = load_or_create_key_file(path).keys
    assert [(k.kid, k.alg) for k in keys] == [
        (es_kid, "ES256"),
        (rs_kid, "RS256"),
        (first.kid, "ES256"),
    ]


@pytest.mark.parametrize("bits", [1024, 2047])
def test_rsa_key_below_2048_bits_is_refused(rs_set: KeySet, bits: int) -> None:
    small = rsa_key(bits)
    with pytest.raises(KeySetError, match="2048"):
        KeySet.from_json(with_key(rs_set, small, "RS256"))
    with pytest.raises(KeySetError):
        SigningKey(kid="small", created_ms=0, private_key=small)


def test_rsa_key_with_a_small_public_exponent_is_refused(rs_set: KeySet) -> None:
    # Exponent 3 is what PKCS#1 v1.5 forgeries against lax verifiers need: refused from a file
    # and when built in code, although the key is large enough.
    small_e = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(KeySetError, match="exponent"):
        KeySet.from_json(with_key(rs_set, small_e, "RS256"))
    with pytest.raises(KeySetError):
        SigningKey(kid="small-e", created_ms=0, private_key=small_e)


def test_larger_rsa_keys_are_accepted(rs_set: KeySet) -> None:
    big = rsa_key(3072)
    key = KeySet.from_json(with_key(rs_set, big, "RS256")).signing_key
    assert (key.alg, key.signature_bytes) == ("RS256", 384)
    tokens = access_tokens(KeySet(keys=(key,), refresh_secret=rs_set.refresh_secret))
    assert tokens.verify(issue(tokens), now=NOW).user_id == "user-1"


@pytest.mark.parametrize(
    ("material", "declared"),
    [
        pytest.param(lambda: rsa_key(), "ES256", id="rsa-key-declared-es256"),
        pytest.param(
            lambda: ec.generate_private_key(ec.SECP256R1()), "RS256", id="p256-declared-rs256"
        ),
        pytest.param(lambda: rsa_key(), "PS256", id="rsa-key-declared-ps256"),
        pytest.param(lambda: rsa_key(), "RS512", id="rsa-key-declared-rs512"),
        pytest.param(lambda: rsa_key(), "HS256", id="rsa-key-declared-hs256"),
        pytest.param(lambda: rsa_key(), "rs256", id="rsa-key-declared-lowercase"),
    ],
)
def test_declared_alg_must_be_the_keys(
    rs_set: KeySet, material: Callable[[], Any], declared: str
) -> None:
    with pytest.raises(KeySetError):
        KeySet.from_json(with_key(rs_set, material(), declared))


def test_generating_an_unknown_algorithm_is_refused() -> None:
    for alg in ("HS256", "PS256", "EdDSA", "rs256", "none"):
        with pytest.raises(KeySetError):
            KeySet.generate(alg)


def test_settings_accept_exactly_the_key_sets_algorithms() -> None:
    assert settings_module.SIGNING_ALGORITHMS == signing_keys.ALGORITHMS
    env = {"TETHER_SIGNING_ALGORITHM": "RS256"}
    assert Settings.load(environ=env).signing_algorithm == "RS256"
    for bad in ("HS256", "rs256", "none", "PS256", ""):
        with pytest.raises(
            SettingsError, match=r"^TETHER_SIGNING_ALGORITHM: must be ES256 or RS256"
        ):
            Settings.load(environ={"TETHER_SIGNING_ALGORITHM": bad})


# ---------------------------------------------------------------------------------- RS256 tokens


def test_rs256_token_is_issued_and_verified(rs_tokens: AccessTokens, rs_key: SigningKey) -> None:
    token = issue(rs_tokens, "user-9")
    assert header_of(token) == {"alg": "RS256", "typ": "at+jwt", "kid": rs_key.kid}
    assert len(unb64(token.split(".")[2])) == 256
    claims = rs_tokens.verify(token, now=NOW)
    assert claims == AccessClaims("user-9", "sess-1", NOW, EXP, claims.token_id)
    # And an independent RS256 implementation agrees that it is a valid RS256 JWS.
    decoded = jwt.decode(
        token, rs_key.public_key, algorithms=["RS256"], audience=AUDIENCE, issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )  # fmt: skip
    assert decoded["sub"] == "user-9"


def test_rs256_hand_made_token_verifies(rs_tokens: AccessTokens, rs_key: SigningKey) -> None:
    """The control for the refusals below: a token made by these helpers verifies."""
    message = signing_input("RS256", rs_key.kid)
    assert isinstance(rs_key.private_key, rsa.RSAPrivateKey)
    token = f"{message}.{b64(rs256(rs_key.private_key, message))}"
    assert rs_tokens.verify(token, now=NOW).user_id == "user-1"


def test_rs256_tampered_payload_and_signature_are_refused(rs_tokens: AccessTokens) -> None:
    header, _, signature = issue(rs_tokens).split(".")
    _, payload, _ = issue(rs_tokens, "admin").split(".")
    assert refusal(rs_tokens, f"{header}.{payload}.{signature}") == INVALID
    raw = bytearray(unb64(signature))
    raw[-1] ^= 1
    assert refusal(rs_tokens, f"{header}.{payload}.{b64(bytes(raw))}") == INVALID


def test_rs256_signature_of_the_wrong_length_is_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey
) -> None:
    """RFC 7518 §3.3: the signature is exactly as long as the modulus; a leading zero byte
    added or (when there is one) removed is not the same signature."""
    assert isinstance(rs_key.private_key, rsa.RSAPrivateKey)
    for attempt in range(64):
        message = signing_input("RS256", rs_key.kid).replace("jti-1", f"jti-{attempt}")
        signature = rs256(rs_key.private_key, message)
        if signature[0] == 0:
            break
    else:
        signature = b""  # no leading zero in 64 tries (odds about 1 in 60,000): skip that form
    assert rs_tokens.verify(
        f"{message}.{b64(signature or rs256(rs_key.private_key, message))}", now=NOW
    )
    forms = [b"\x00" + rs256(rs_key.private_key, message), rs256(rs_key.private_key, message)[:-1]]
    if signature:
        forms.append(signature[1:])
    for form in forms:
        assert refusal(rs_tokens, f"{message}.{b64(form)}") == INVALID


def test_rs256_from_another_rsa_key_with_our_kid_is_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey
) -> None:
    message = signing_input("RS256", rs_key.kid)
    assert refusal(rs_tokens, f"{message}.{b64(rs256(rsa_key(), message))}") == INVALID


# ---------------------------------------------------------------------------------- alg confusion


def _rsa_public_forms(key: SigningKey) -> dict[str, bytes]:
    public = key.public_key
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    return {
        "spki-pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pkcs1-pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ),
        "spki-der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pkcs1-der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        ),
        "ssh": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "jwk": json.dumps(key.public_jwk()).encode(),
        "jwk-compact": json_bytes(key.public_jwk()),
        "modulus": numbers.n.to_bytes(256, "big"),
        "n-b64": key.public_jwk()["n"].encode(),
        "kid": key.kid.encode(),
    }


FORMS = [
    "spki-pem",
    "pkcs1-pem",
    "spki-der",
    "pkcs1-der",
    "ssh",
    "jwk",
    "jwk-compact",
    "modulus",
    "n-b64",
    "kid",
]


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "RS256", "ES256"])
@pytest.mark.parametrize("form", FORMS)
def test_hmac_keyed_with_our_rsa_public_key_is_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey, form: str, alg: str
) -> None:
    """The classic RS256 key confusion: a verifier that let the header choose HS256 would key
    the HMAC with the public key, which anyone has."""
    message = signing_input(alg, rs_key.kid)
    digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}.get(alg, hashlib.sha256)
    mac = hmac.new(_rsa_public_forms(rs_key)[form], message.encode(), digest).digest()
    assert refusal(rs_tokens, f"{message}.{b64(mac)}") == INVALID
    # PyJWT, asked the same with HS256 allowed, refuses to use an asymmetric key as a secret
    # too; Tether never gets as far as choosing a key type from the header.


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "", None, ["RS256"], {"alg": "RS256"}])
@pytest.mark.parametrize("signature", ["", "signed"])
def test_alg_none_and_malformed_alg_on_an_rsa_kid_are_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey, alg: Any, signature: str
) -> None:
    assert isinstance(rs_key.private_key, rsa.RSAPrivateKey)
    message = signing_input(alg, rs_key.kid)
    sig = b64(rs256(rs_key.private_key, message)) if signature else ""
    assert refusal(rs_tokens, f"{message}.{sig}") == INVALID


def test_es256_header_with_an_rsa_kid_is_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey
) -> None:
    assert isinstance(rs_key.private_key, rsa.RSAPrivateKey)
    message = signing_input("ES256", rs_key.kid)
    attacker = ec.generate_private_key(ec.SECP256R1())
    for signature in (
        es256_signature(
            attacker, message.encode()
        ),  # a valid ES256 signature, by a key that is not ours
        rs256(rs_key.private_key, message),  # our own RSA signature over this very header
        bytes(64),
    ):
        assert refusal(rs_tokens, f"{message}.{b64(signature)}") == INVALID


def test_rs256_header_with_an_ec_kid_is_refused(mixed_set: KeySet, rs_key: SigningKey) -> None:
    """In a mixed set, an RS256 signature that verifies under one of the set's RSA keys still
    does not pass under the kid of an ES256 key."""
    tokens = access_tokens(mixed_set)
    ec_key = mixed_set.keys[1]
    assert ec_key.alg == "ES256"
    assert isinstance(rs_key.private_key, rsa.RSAPrivateKey)
    message = signing_input("RS256", ec_key.kid)
    assert refusal(tokens, f"{message}.{b64(rs256(rs_key.private_key, message))}") == INVALID
    # Our own ES256 key's valid signature, over a header that says RS256.
    assert isinstance(ec_key.private_key, ec.EllipticCurvePrivateKey)
    message = signing_input("RS256", ec_key.kid)
    assert (
        refusal(tokens, f"{message}.{b64(es256_signature(ec_key.private_key, message.encode()))}")
        == INVALID
    )
    # A genuine RS256 token with its kid swapped for the EC key's, and the reverse.
    for token, other in ((issue(tokens), ec_key.kid), (es_token(ec_key), rs_key.kid)):
        header = header_of(token) | {"kid": other}
        _, payload, signature = token.split(".")
        assert refusal(tokens, f"{b64(json_bytes(header))}.{payload}.{signature}") == INVALID


def es_token(key: SigningKey) -> str:
    assert isinstance(key.private_key, ec.EllipticCurvePrivateKey)
    message = signing_input("ES256", key.kid)
    return f"{message}.{b64(es256_signature(key.private_key, message.encode()))}"


@pytest.mark.parametrize("alg", ["PS256", "RS384", "RS512", "PS512"])
def test_other_rsa_algorithms_with_our_own_rsa_key_are_refused(
    rs_tokens: AccessTokens, rs_key: SigningKey, alg: str
) -> None:
    """Signed by our own private key, only the algorithm is wrong: still refused."""
    forged = jwt.encode(
        good_claims(),
        rs_key.private_key,
        algorithm=alg,
        headers={"kid": rs_key.kid, "typ": "at+jwt"},
    )
    assert header_of(forged)["alg"] == alg
    assert refusal(rs_tokens, forged) == INVALID


# ---------------------------------------------------------------------------------- migration


def test_mixed_set_verifies_both_algorithms_until_the_old_key_drops_out() -> None:
    """Rotating an ES256 set to RS256: ES256 tokens verify until their key leaves the set."""
    start = KeySet.generate("ES256")
    old = issue(access_tokens(start))
    assert header_of(old)["alg"] == "ES256"
    current = start.rotated("RS256")
    for _ in range(MAX_KEYS - 1):
        tokens = access_tokens(current)
        new = issue(tokens)
        assert header_of(new)["alg"] == "RS256"
        assert tokens.verify(new, now=NOW).user_id == "user-1"
        assert tokens.verify(old, now=NOW).user_id == "user-1"
        current = current.rotated("RS256")
    assert [k.alg for k in current.keys] == ["RS256"] * MAX_KEYS
    assert refusal(access_tokens(current), old) == INVALID


def test_mixed_set_publishes_both_kinds_of_jwk(mixed_set: KeySet) -> None:
    rs_jwk, ec_jwk = mixed_set.jwks()["keys"]
    assert set(rs_jwk) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (rs_jwk["kty"], rs_jwk["alg"], rs_jwk["use"], rs_jwk["e"]) == (
        "RSA",
        "RS256",
        "sig",
        "AQAB",
    )
    public = mixed_set.keys[0].public_key
    assert isinstance(public, rsa.RSAPublicKey)
    assert int.from_bytes(unb64(rs_jwk["n"]), "big") == public.public_numbers().n
    assert len(unb64(rs_jwk["n"])) == 256  # no leading zero byte (RFC 7518 §6.3.1.1)
    assert set(ec_jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (ec_jwk["kty"], ec_jwk["alg"]) == ("EC", "ES256")


# ---------------------------------------------------------------------------------- a real server


async def test_server_with_rs256_signs_publishes_and_accepts_rs256(
    server_factory: Callable[..., ServerProcess], server_env: dict[str, str]
) -> None:
    server = server_factory(env={"TETHER_SIGNING_ALGORITHM": "RS256"})
    keys = json.loads(Path(server_env["TETHER_KEYS_FILE"]).read_text())["keys"]
    assert [k["alg"] for k in keys] == ["RS256"]
    jwks = httpx.get(server.base_url + "/.well-known/jwks.json").json()["keys"]
    assert [(k["kty"], k["alg"], k["kid"]) for k in jwks] == [("RSA", "RS256", keys[0]["kid"])]

    tokens = await signup(server.base_url)
    token = tokens["accessToken"]
    assert header_of(token) == {"alg": "RS256", "typ": "at+jwt", "kid": keys[0]["kid"]}
    async with await connect_sync(server.ws_url) as client:
        await client.send({"type": "authenticate", "token": token, "authVersion": 1})
        assert (await client.expect("auth_ok"))["type"] == "auth_ok"
        # The same claims under an ES256 header: refused on the socket as well.
        _, payload, signature = token.split(".")
        forged = f"{b64(json_bytes(header_of(token) | {'alg': 'ES256'}))}.{payload}.{signature}"
        await client.send({"type": "authenticate", "token": forged, "authVersion": 2})
        assert (await client.expect("auth_error"))["code"] == "invalid_token"


async def test_running_server_moves_from_es256_to_rs256_on_rotation(
    server_factory: Callable[..., ServerProcess], server_env: dict[str, str]
) -> None:
    """A live migration: tokens of the old ES256 key keep working while new ones are RS256."""
    server = server_factory()
    user = await signup(server.base_url)
    old = user["accessToken"]
    assert header_of(old)["alg"] == "ES256"
    keys_file = Path(server_env["TETHER_KEYS_FILE"])
    rotate_key_file(keys_file, "RS256")
    # The instance looks at the file at most every RELOAD_INTERVAL: sign in until it has.
    deadline = time.monotonic() + 30
    while True:
        fresh = (await signin(server.base_url, user["email"]))["accessToken"]
        if header_of(fresh)["alg"] == "RS256" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert header_of(fresh)["alg"] == "RS256"
    for token in (old, fresh):
        async with await connect_sync(server.ws_url) as client:
            await client.send({"type": "authenticate", "token": token, "authVersion": 1})
            await client.expect("auth_ok")
    # The HTTP bearer check takes both as well: each signs its own session out.
    for token in (old, fresh):
        assert (await auth_post(server.base_url, "/auth/signout", token=token)).status_code == 204
