"""Adversarial unit tests of access-token verification (protocol §2) and of the key set.

Pure: no network, no Redis. Time reaches :meth:`AccessTokens.verify` through ``now=``, key files
live in ``tmp_path``, and the :class:`KeyRing` reload timer reads
``tether.server.auth.signing_keys.time``, which the ``mono`` fixture replaces. Tokens are built by
hand (:func:`make_token`) so that any header, claim or signature can be produced; every refusal
starts from a token that *does* verify (:func:`test_hand_made_token_verifies`) and changes one
thing, so a refusal cannot come from a broken helper.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    encode_dss_signature,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tether.protocol import AuthErrorCode
from tether.server.auth import signing_keys as keys_module
from tether.server.auth import tokens as tokens_module
from tether.server.auth.signing_keys import (
    MAX_KEYS,
    RELOAD_INTERVAL,
    KeyRing,
    KeySet,
    KeySetError,
    SigningKey,
    load_or_create_key_file,
    rotate_key_file,
)
from tether.server.auth.tokens import MAX_TOKEN_BYTES, AccessClaims, AccessTokens, TokenError

from tests.token_kit import (
    AUDIENCE,
    EXP,
    INVALID,
    ISSUER,
    LEEWAY,
    NOW,
    access_tokens,
    b64,
    es256_signature,
    good_claims,
    json_bytes,
    refusal,
    unb64,
)

EXPIRED = AuthErrorCode.TOKEN_EXPIRED
#: Order of the P-256 group: ECDSA signatures (r, s) and (r, n - s) are both valid.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: The claims protocol §2 requires; spelled out rather than imported so that dropping one from
#: ``tether.server.auth.tokens.REQUIRED_CLAIMS`` fails a test instead of shrinking it.
CONTRACT_CLAIMS = ("iss", "aud", "sub", "sid", "iat", "exp", "jti")


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: In a change set: remove this header parameter or claim.
DROP: Any = _Drop()


# ---------------------------------------------------------------------------------- helpers


def secret_b64(data: bytes) -> str:
    """The key file's encoding of the refresh secret: base64url *with* padding."""
    return base64.urlsafe_b64encode(data).decode()


def changed(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    for name, value in (changes or {}).items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def good_header(key: SigningKey) -> dict[str, Any]:
    return {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}


def make_token(
    key: SigningKey,
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
    *,
    payload: bytes | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
) -> str:
    """A compact JWS, ES256-signed by ``signer`` (default: ``key``), with the good header and
    claims changed by ``header`` and ``claims`` (``DROP`` removes one); ``payload`` replaces the
    claims' JSON bytes outright."""
    body = payload if payload is not None else json_bytes(changed(good_claims(), claims))
    signing_input = f"{b64(json_bytes(changed(good_header(key), header)))}.{b64(body)}"
    signature = es256_signature(signer or key.private_key, signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


def with_signature(token: str, signature: bytes | str) -> str:
    head, _, _ = token.rpartition(".")
    return f"{head}.{signature if isinstance(signature, str) else b64(signature)}"


def expected_claims(**changes: Any) -> AccessClaims:
    c = changed(good_claims(), changes)
    return AccessClaims(c["sub"], c["sid"], c["iat"], c["exp"], c["jti"])


@pytest.fixture
def keyset() -> KeySet:
    return KeySet.generate()


@pytest.fixture
def key(keyset: KeySet) -> SigningKey:
    return keyset.signing_key


@pytest.fixture
def tokens(keyset: KeySet) -> AccessTokens:
    return access_tokens(keyset)


@pytest.fixture
def token(key: SigningKey) -> str:
    return make_token(key)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------------------------- valid tokens


def test_issued_token_verifies_with_its_claims(tokens: AccessTokens, key: SigningKey) -> None:
    issued = tokens.issue(user_id="user-9", session_id="sess-9", now=NOW + 0.7, expires_at=EXP)
    claims = tokens.verify(issued, now=NOW + 1)
    assert claims == AccessClaims("user-9", "sess-9", NOW, EXP, claims.token_id)
    assert isinstance(claims.token_id, str) and len(claims.token_id) >= 16
    assert jwt.get_unverified_header(issued) == {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}
    payload = json.loads(unb64(issued.split(".")[1]))
    assert (payload["iss"], payload["aud"]) == (ISSUER, AUDIENCE)
    again = tokens.issue(user_id="user-9", session_id="sess-9", now=NOW, expires_at=EXP)
    assert tokens.verify(again, now=NOW).token_id != claims.token_id


def test_hand_made_token_verifies(tokens: AccessTokens, token: str) -> None:
    """The control for every refusal below: the helpers make a token that verifies."""
    assert tokens.verify(token, now=NOW) == expected_claims()


def test_extra_claims_and_header_parameters_are_ignored(
    tokens: AccessTokens, key: SigningKey
) -> None:
    forged = make_token(key, {"cty": "x"}, {"scope": "admin", "nbf": NOW - 10})
    assert tokens.verify(forged, now=NOW) == expected_claims()


# ---------------------------------------------------------------------------------- alg


@pytest.mark.parametrize(
    "alg",
    [
        "none",
        "None",
        "NONE",
        "nOnE",
        None,
        DROP,
        "",
        "es256",
        "ES256 ",
        " ES256",
        "ES256\x00",
        "HS256",
        "RS256",
        "PS256",
        "EdDSA",
        "ES384",
        "ES512",
        "ES256K",
        ["ES256"],
        {"alg": "ES256"},
    ],
)
@pytest.mark.parametrize("signed", [True, False], ids=["our-signature", "empty-signature"])
def test_any_alg_but_es256_is_refused(
    tokens: AccessTokens, key: SigningKey, alg: Any, signed: bool
) -> None:
    # Signed by our key over the altered header, so only the alg can be the reason.
    forged = make_token(key, {"alg": alg})
    if not signed:
        forged = forged.rpartition(".")[0] + "."
    assert refusal(tokens, forged) == INVALID


def _pem(key: SigningKey) -> bytes:
    return key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


HMAC_SECRETS_FROM_OUR_PUBLIC_KEY: dict[str, Callable[[SigningKey], bytes]] = {
    "pem": _pem,
    "pem-stripped": lambda k: _pem(k).strip(),
    "der": lambda k: k.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ),
    "x962-uncompressed": lambda k: k.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    ),
    "x962-compressed": lambda k: k.public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    ),
    "jwk": lambda k: json.dumps(k.public_jwk()).encode(),
    "jwk-compact": lambda k: json_bytes(k.public_jwk()),
    "jwks": lambda k: json_bytes({"keys": [k.public_jwk()]}),
    "kid": lambda k: k.kid.encode(),
}


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
@pytest.mark.parametrize(
    "secret_of", HMAC_SECRETS_FROM_OUR_PUBLIC_KEY.values(), ids=HMAC_SECRETS_FROM_OUR_PUBLIC_KEY
)
def test_hmac_signed_with_our_public_key_is_refused(
    tokens: AccessTokens, key: SigningKey, secret_of: Callable[[SigningKey], bytes], alg: str
) -> None:
    """Key confusion: the public key is public, so an HMAC keyed with it proves nothing."""
    header = changed(good_header(key), {"alg": alg})
    signing_input = f"{b64(json_bytes(header))}.{b64(json_bytes(good_claims()))}"
    mac = hmac.new(secret_of(key), signing_input.encode(), hashlib.sha256).digest()
    assert refusal(tokens, f"{signing_input}.{b64(mac)}") == INVALID


def _other_keys(rsa_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "RS256": rsa_key,
        "PS256": rsa_key,
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "ES512": ec.generate_private_key(ec.SECP521R1()),
        "ES256K": ec.generate_private_key(ec.SECP256K1()),
    }


@pytest.mark.parametrize("alg", ["RS256", "PS256", "EdDSA", "ES384", "ES512", "ES256K"])
def test_other_algorithms_with_other_keys_are_refused(
    tokens: AccessTokens, key: SigningKey, rsa_key: rsa.RSAPrivateKey, alg: str
) -> None:
    forged = jwt.encode(
        good_claims(),
        _other_keys(rsa_key)[alg],
        algorithm=alg,
        headers={"kid": key.kid, "typ": "at+jwt"},
    )
    assert jwt.get_unverified_header(forged)["alg"] == alg
    assert refusal(tokens, forged) == INVALID


def test_es256_from_another_p256_key_with_our_kid_is_refused(
    tokens: AccessTokens, key: SigningKey
) -> None:
    attacker = ec.generate_private_key(ec.SECP256R1())
    assert refusal(tokens, make_token(key, signer=attacker)) == INVALID


@pytest.mark.parametrize("param", ["jwk", "jku", "x5u", "x5c"])
def test_keys_named_in_the_header_are_not_trusted(
    tokens: AccessTokens, key: SigningKey, param: str
) -> None:
    """Only the kid selects a key, and only among ours: an embedded or linked key is ignored."""
    attacker = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(attacker.public_key()))
    values = {
        "jwk": jwk,
        "jku": "https://evil.test/jwks.json",
        "x5u": "https://evil.test/cert.pem",
        "x5c": [b64(b"not a certificate")],
    }
    assert refusal(tokens, make_token(key, {param: values[param]}, signer=attacker)) == INVALID


# ---------------------------------------------------------------------------------- kid


@pytest.mark.parametrize(
    "kid",
    [
        DROP,
        None,
        0,
        1,
        True,
        ["KID"],
        {"kid": "KID"},
        "",
        "unknown",
        "KID ",
        " KID",
        "KID\x00",
        "../../../../etc/passwd",
        "..%2f..%2fkeys.json",
        "/dev/zero",
        "k" * 2000,
    ],
)
def test_kid_that_names_none_of_our_keys_is_refused(
    tokens: AccessTokens, key: SigningKey, kid: Any
) -> None:
    """``KID`` stands for our signing key's kid; the token is otherwise valid and signed by it."""
    if isinstance(kid, str):
        kid = kid.replace("KID", key.kid)
    elif isinstance(kid, list | dict):
        kid = json.loads(json.dumps(kid).replace("KID", key.kid))
    assert refusal(tokens, make_token(key, {"kid": kid})) == INVALID


def test_kid_is_case_sensitive(tokens: AccessTokens, key: SigningKey) -> None:
    swapped = key.kid.swapcase()
    if swapped == key.kid:  # a kid of digits, - and _ only (astronomically unlikely)
        pytest.skip("the kid has no letters")
    assert refusal(tokens, make_token(key, {"kid": swapped})) == INVALID


def test_path_like_kid_on_a_key_file_reads_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mono: FakeTime
) -> None:
    ring = KeyRing(path=tmp_path / "keys.json")
    tokens = access_tokens(ring)
    key = ring.current.signing_key
    read: list[Path] = []
    real_read_text = Path.read_text

    def recording_read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        read.append(self)
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", recording_read_text)
    mono.advance(RELOAD_INTERVAL + 1)
    for kid in ("../../../../etc/passwd", str(tmp_path / "keys.json"), "keys.json"):
        assert refusal(tokens, make_token(key, {"kid": kid})) == INVALID
    assert read == []  # the key file did not change, so not even it was read again


# ---------------------------------------------------------------------------------- tampering


def test_tampered_payload_is_refused(tokens: AccessTokens, token: str) -> None:
    header, payload, signature = token.split(".")
    for change in ({"sub": "admin"}, {"exp": EXP + 86_400}, {"sid": "sess-2"}):
        claims = json.loads(unb64(payload)) | change
        assert refusal(tokens, f"{header}.{b64(json_bytes(claims))}.{signature}") == INVALID


def test_tampered_header_is_refused(tokens: AccessTokens, key: SigningKey, token: str) -> None:
    _, payload, signature = token.split(".")
    # Same parameters, another serialisation: the signature covers the bytes, not the meaning.
    header = json.dumps(good_header(key), indent=1).encode()
    assert refusal(tokens, f"{b64(header)}.{payload}.{signature}") == INVALID


def test_segments_spliced_from_two_valid_tokens_are_refused(
    tokens: AccessTokens, key: SigningKey
) -> None:
    ours = make_token(key)
    theirs = make_token(key, claims={"sub": "admin", "jti": "jti-2"})
    assert tokens.verify(theirs, now=NOW).user_id == "admin"
    h1, p1, s1 = ours.split(".")
    h2, p2, s2 = theirs.split(".")
    for spliced in (f"{h1}.{p2}.{s1}", f"{h2}.{p1}.{s2}", f"{h1}.{p1}.{s2}", f"{p1}.{h1}.{s1}"):
        assert refusal(tokens, spliced) == INVALID


def _signature_variants() -> dict[str, Callable[[bytes], bytes]]:
    def flip(byte: int, bit: int) -> Callable[[bytes], bytes]:
        def apply(sig: bytes) -> bytes:
            out = bytearray(sig)
            out[byte] ^= 1 << bit
            return bytes(out)

        return apply

    n = P256_ORDER.to_bytes(32, "big")
    return {
        "flip-r-first-bit": flip(0, 7),
        "flip-r-last-bit": flip(31, 0),
        "flip-s-first-bit": flip(32, 7),
        "flip-s-last-bit": flip(63, 0),
        "r-s-swapped": lambda sig: sig[32:] + sig[:32],
        "truncated-63": lambda sig: sig[:63],
        "extended-65": lambda sig: sig + b"\x00",
        "leading-zero-65": lambda sig: b"\x00" + sig,
        "doubled": lambda sig: sig + sig,
        # CVE-2022-21449 ("psychic signatures"): r = s = 0 verified anything in Java 15-18.
        "zero": lambda sig: bytes(64),
        "r-s-equal-n": lambda _: n + n,
        "r-zero": lambda sig: bytes(32) + sig[32:],
        "s-zero": lambda sig: sig[:32] + bytes(32),
        # The same (r, s) in DER, as OpenSSL produces it: not the JWS form, so not accepted.
        "der": lambda sig: encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        ),
    }


@pytest.mark.parametrize(
    "variant", _signature_variants().values(), ids=_signature_variants().keys()
)
def test_tampered_signature_is_refused(
    tokens: AccessTokens, token: str, variant: Callable[[bytes], bytes]
) -> None:
    signature = unb64(token.rpartition(".")[2])
    assert variant(signature) != signature
    assert refusal(tokens, with_signature(token, variant(signature))) == INVALID


def test_our_signature_over_another_message_is_refused(
    tokens: AccessTokens, key: SigningKey, token: str
) -> None:
    other = make_token(key, claims={"jti": "jti-2"})
    assert refusal(tokens, with_signature(token, other.rpartition(".")[2])) == INVALID


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_non_canonical_spelling_of_a_segment_is_refused(
    tokens: AccessTokens, token: str, part: int
) -> None:
    """base64url's last character may carry bits that encode nothing: setting them gives
    another spelling of the same bytes. Only the canonical one verifies (found by the fuzz test
    below once verification stopped going through PyJWT)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    segments = token.split(".")
    segment = segments[part]
    unused = {2: 0x0F, 3: 0x03}.get(len(segment) % 4)
    assert unused is not None  # the fixture's segments all have a length with unused bits
    last = alphabet.index(segment[-1])
    assert last & unused == 0  # ours are canonical
    segments[part] = segment[:-1] + alphabet[last | 1]
    assert unb64(segments[part]) == unb64(segment)  # the same bytes, spelled differently
    assert refusal(tokens, ".".join(segments)) == INVALID


def test_ecdsa_high_s_twin_verifies_with_the_same_claims(tokens: AccessTokens, token: str) -> None:
    """ECDSA is malleable: (r, n - s) is a second valid signature of the same token, and PyJWT
    (like most JOSE libraries) accepts it. Harmless as long as nothing keys on the token string;
    the token's identity is its ``jti`` (and the session's ``sid``), which the twin shares. If
    verification ever enforces low-s, turn this test around."""
    signature = unb64(token.rpartition(".")[2])
    s = int.from_bytes(signature[32:], "big")
    twin = with_signature(token, signature[:32] + (P256_ORDER - s).to_bytes(32, "big"))
    assert twin != token
    assert tokens.verify(twin, now=NOW) == tokens.verify(token, now=NOW)


# ---------------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    ("now", "code"),
    [
        (NOW, None),
        (EXP - 1, None),
        (EXP, None),
        (EXP + LEEWAY - 0.1, None),  # exp + 4.9: inside the leeway
        (EXP + LEEWAY - 1e-6, None),
        (EXP + LEEWAY, EXPIRED),  # exp + 5: the code refuses now >= exp + leeway
        (EXP + LEEWAY + 1e-6, EXPIRED),
        (EXP + 86_400 * 365, EXPIRED),
    ],
)
def test_expiry_boundary(tokens: AccessTokens, token: str, now: float, code: Any) -> None:
    if code is None:
        assert tokens.verify(token, now=now) == expected_claims()
    else:
        assert refusal(tokens, token, now=now) == code


def test_issued_token_expires_at_exp_plus_leeway(tokens: AccessTokens) -> None:
    issued = tokens.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    assert tokens.verify(issued, now=EXP + LEEWAY - 0.1).expires_at == EXP
    assert refusal(tokens, issued, now=EXP + LEEWAY) == EXPIRED


def test_expired_and_otherwise_invalid_is_invalid_not_expired(
    tokens: AccessTokens, key: SigningKey, token: str
) -> None:
    """``token_expired`` is only said of a token that is ours and otherwise valid: a forged or
    foreign token learns nothing about its expiry."""
    late = EXP + LEEWAY + 60
    assert refusal(tokens, token, now=late) == EXPIRED
    attacker = ec.generate_private_key(ec.SECP256R1())
    for forged in (
        make_token(key, signer=attacker),
        make_token(key, {"kid": "unknown"}),
        make_token(key, {"typ": "JWT"}),
        make_token(key, claims={"aud": "other"}),
        make_token(key, claims={"iss": "https://evil.test"}),
        make_token(key, claims={"sid": DROP}),
    ):
        assert refusal(tokens, forged, now=late) == INVALID


@pytest.mark.parametrize(
    ("iat", "now", "accepted"),
    [
        (NOW, NOW, True),
        (NOW + LEEWAY, NOW, True),  # the verifier's clock is 5 s behind the issuer's: tolerated
        (NOW + LEEWAY + 1, NOW, False),
        (NOW, NOW - LEEWAY, True),
        (NOW, NOW - LEEWAY - 0.1, False),
        (NOW + 86_400, NOW, False),
    ],
)
def test_iat_in_the_future_beyond_leeway_is_refused(
    tokens: AccessTokens, key: SigningKey, iat: int, now: float, accepted: bool
) -> None:
    forged = make_token(key, claims={"iat": iat})
    if accepted:
        assert tokens.verify(forged, now=now).issued_at == iat
    else:
        assert refusal(tokens, forged, now=now) == INVALID


@pytest.mark.parametrize(
    ("nbf", "accepted"),
    [
        (NOW - 100, True),
        (NOW, True),
        (NOW + LEEWAY, True),
        (NOW + LEEWAY - 0.5, True),  # nbf may be fractional (RFC 7519 NumericDate)
        (NOW + LEEWAY + 0.5, False),
        (NOW + LEEWAY + 1, False),
        (NOW + 86_400, False),
    ],
)
def test_nbf_in_the_future_beyond_leeway_is_refused(
    tokens: AccessTokens, key: SigningKey, nbf: float, accepted: bool
) -> None:
    forged = make_token(key, claims={"nbf": nbf})
    if accepted:
        assert tokens.verify(forged, now=NOW) == expected_claims()
    else:
        assert refusal(tokens, forged, now=NOW) == INVALID


@pytest.mark.parametrize("nbf", ['"soon"', "true", "[1]", "{}", "Infinity"])
def test_malformed_nbf_is_refused(tokens: AccessTokens, key: SigningKey, nbf: str) -> None:
    payload = json_bytes(good_claims())[:-1] + b',"nbf":' + nbf.encode() + b"}"
    assert refusal(tokens, make_token(key, payload=payload)) == INVALID


@pytest.mark.parametrize("nbf", ["NaN", "-Infinity"])
def test_non_json_number_nbf_is_refused(tokens: AccessTokens, key: SigningKey, nbf: str) -> None:
    payload = json_bytes(good_claims())[:-1] + b',"nbf":' + nbf.encode() + b"}"
    assert refusal(tokens, make_token(key, payload=payload)) == INVALID


# ---------------------------------------------------------------------------------- claims


@pytest.mark.parametrize("claim", CONTRACT_CLAIMS)
@pytest.mark.parametrize("how", ["missing", "null"])
def test_each_required_claim_missing_is_refused(
    tokens: AccessTokens, key: SigningKey, claim: str, how: str
) -> None:
    forged = make_token(key, claims={claim: DROP if how == "missing" else None})
    assert refusal(tokens, forged) == INVALID


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("exp", str(EXP)),
        ("exp", True),
        ("exp", False),
        # RFC 7519 allows a fractional NumericDate; we issue integers and accept only integers.
        ("exp", float(EXP)),
        ("exp", EXP + 0.5),
        ("exp", [EXP]),
        ("exp", {"$date": EXP}),
        ("iat", str(NOW)),
        ("iat", True),
        ("iat", NOW + 0.5),
        ("sub", ""),
        ("sub", 123),
        ("sub", ["user-1"]),
        ("sub", {"id": "user-1"}),
        ("sub", True),
        ("sid", ""),
        ("sid", 5),
        ("sid", ["sess-1"]),
        ("jti", ""),
        ("jti", 5),
        ("jti", ["jti-1"]),
        ("iss", 5),
        ("iss", [ISSUER]),
        ("aud", 5),
        ("aud", {"aud": AUDIENCE}),
    ],
)
def test_wrongly_typed_claim_is_refused(
    tokens: AccessTokens, key: SigningKey, claim: str, value: Any
) -> None:
    assert refusal(tokens, make_token(key, claims={claim: value})) == INVALID


@pytest.mark.parametrize("exp", ["Infinity", "1e400", "1.7e9"])
def test_non_integer_exp_literal_is_refused(
    tokens: AccessTokens, key: SigningKey, exp: str
) -> None:
    payload = (
        json_bytes(changed(good_claims(), {"exp": DROP}))[:-1] + b',"exp":' + exp.encode() + b"}"
    )
    assert refusal(tokens, make_token(key, payload=payload)) == INVALID


@pytest.mark.parametrize(
    "iss", ["https://evil.test", ISSUER + "/", ISSUER.upper(), " " + ISSUER, "", "tether"]
)
def test_wrong_issuer_is_refused(tokens: AccessTokens, key: SigningKey, iss: str) -> None:
    assert refusal(tokens, make_token(key, claims={"iss": iss})) == INVALID


@pytest.mark.parametrize(
    "aud",
    [
        "other",
        "",
        AUDIENCE.upper(),
        AUDIENCE + " ",
        # We issue aud as one string, and strict_aud refuses an array even when it holds ours: a
        # token minted for several audiences is not an access token for this one (RFC 8725 §3.9).
        [AUDIENCE],
        [AUDIENCE, "other"],
        ["other", AUDIENCE],
        [],
    ],
)
def test_wrong_audience_is_refused(tokens: AccessTokens, key: SigningKey, aud: Any) -> None:
    assert refusal(tokens, make_token(key, claims={"aud": aud})) == INVALID


# ---------------------------------------------------------------------------------- typ, crit


@pytest.mark.parametrize(
    "typ",
    [
        "JWT",
        DROP,
        None,
        "",
        # RFC 7515 §4.1.9 makes typ a media type, compared case-insensitively, and RFC 9068 §4
        # lets a validator accept "application/at+jwt". We are the only issuer and always write
        # exactly "at+jwt" (protocol §2), so the comparison is exact: variants would only widen
        # what reaches the signature check.
        "at+JWT",
        "AT+JWT",
        "application/at+jwt",
        "at+jwt ",
        "jwt",
        ["at+jwt"],
    ],
)
def test_typ_other_than_exactly_at_jwt_is_refused(
    tokens: AccessTokens, key: SigningKey, typ: Any
) -> None:
    assert refusal(tokens, make_token(key, {"typ": typ})) == INVALID


@pytest.mark.parametrize(
    "header",
    [
        {"crit": ["x-tether-unknown"], "x-tether-unknown": True},
        {"crit": ["exp"]},  # a registered claim name, not a header extension: still refused
        {"crit": ["exp"], "exp": EXP},
        {"crit": []},
        {"crit": "exp"},
        {"crit": None},
        {"crit": ["b64"], "b64": True},
        {"crit": ["b64"], "b64": False},
        {"b64": False},
    ],
    ids=lambda h: json.dumps(h),
)
def test_crit_header_is_refused(
    tokens: AccessTokens, key: SigningKey, header: dict[str, Any]
) -> None:
    assert refusal(tokens, make_token(key, header)) == INVALID


@pytest.mark.parametrize(
    "header_bytes",
    [
        pytest.param(b"[" * 2500, id="nested-beyond-recursion-limit"),
        pytest.param(b'{"a":' * 400 + b"1" + b"}" * 400, id="nested-objects"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"null", id="null"),
        pytest.param(b'"ES256"', id="string"),
        pytest.param(b"1", id="number"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"alg":"ES256","typ":"at+jwt","kid":"x"', id="truncated-json"),
    ],
)
def test_malformed_header_is_refused(tokens: AccessTokens, token: str, header_bytes: bytes) -> None:
    _, payload, signature = token.split(".")
    forged = f"{b64(header_bytes)}.{payload}.{signature}"
    assert len(forged) <= MAX_TOKEN_BYTES
    assert refusal(tokens, forged) == INVALID


# ---------------------------------------------------------------------------------- shapes


def _jwe_like(token: str) -> str:
    payload = token.split(".")[1]
    jwe_header = b64(json_bytes({"alg": "RSA-OAEP", "enc": "A256GCM", "typ": "at+jwt"}))
    return (
        f"{jwe_header}.{b64(os.urandom(256))}.{b64(os.urandom(12))}.{payload}.{b64(os.urandom(16))}"
    )


def _json_serialisation(token: str, flattened: bool) -> dict[str, Any]:
    header, payload, signature = token.split(".")
    if flattened:
        return {"protected": header, "payload": payload, "signature": signature}
    return {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}


NOT_COMPACT: dict[str, Callable[[str], object]] = {
    "empty": lambda t: "",
    "dot": lambda t: ".",
    "dots": lambda t: "..",
    "two-segments": lambda t: t.rpartition(".")[0],
    "four-segments": lambda t: t + ".e30",
    "jwe-like": _jwe_like,
    "jwe-dir-like": lambda t: t.split(".")[0] + "..aXY.Y3Q.dGFn",
    "trailing-dot": lambda t: t + ".",
    "leading-dot": lambda t: "." + t,
    "empty-payload": lambda t: t.split(".")[0] + ".." + t.split(".")[2],
    "leading-space": lambda t: " " + t,
    "trailing-space": lambda t: t + " ",
    "trailing-crlf": lambda t: t + "\r\n",
    "inner-space": lambda t: t.replace(".", ". ", 1),
    "inner-newline": lambda t: t.replace(".", ".\n", 1),
    "tab": lambda t: t[:10] + "\t" + t[10:],
    "bearer-prefix": lambda t: "Bearer " + t,
    "quoted": lambda t: json.dumps(t),
    "padded-signature": lambda t: t + "==",
    "padded-header": lambda t: t.replace(".", "=.", 1),
    "standard-base64-alphabet": lambda t: t.replace("-", "+").replace("_", "/") + "+/",
    "fullwidth-letter": lambda t: "\uff21" + t[1:],
    "non-ascii-digit": lambda t: t[:5] + "\u0661" + t[6:],
    "nul": lambda t: t[:20] + "\x00" + t[20:],
    "json-flattened": lambda t: json.dumps(_json_serialisation(t, True)),
    "json-general": lambda t: json.dumps(_json_serialisation(t, False)),
}

NOT_A_STRING: dict[str, Callable[[str], object]] = {
    "none": lambda t: None,
    "int": lambda t: 0,
    "big-int": lambda t: 10**100,
    "float": lambda t: 1.5,
    "bool": lambda t: True,
    "bytes": lambda t: t.encode(),
    "bytearray": lambda t: bytearray(t.encode()),
    "memoryview": lambda t: memoryview(t.encode()),
    "dict": lambda t: _json_serialisation(t, True),
    "list": lambda t: t.split("."),
    "tuple": lambda t: tuple(t.split(".")),
    "object": lambda t: object(),
}


@pytest.mark.parametrize(
    "shape",
    [*NOT_COMPACT.values(), *NOT_A_STRING.values(), lambda t: t + "\n"],
    ids=[*NOT_COMPACT, *NOT_A_STRING, "trailing-newline"],
)
def test_non_compact_input_is_refused(
    tokens: AccessTokens, token: str, shape: Callable[[str], object]
) -> None:
    assert refusal(tokens, shape(token)) == INVALID


@pytest.fixture
def no_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decoding of a token segment an AssertionError (which is not a TokenError)."""

    def parse_forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the token reached the JOSE parser")

    monkeypatch.setattr(tokens_module, "_segment", parse_forbidden)
    monkeypatch.setattr(tokens_module, "_json_object", parse_forbidden)
    monkeypatch.setattr(jwt, "get_unverified_header", parse_forbidden)
    monkeypatch.setattr(jwt, "decode", parse_forbidden)


def _compact_of_length(token: str, length: int) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{'A' * (length - len(header) - len(signature) - 2)}.{signature}"


@pytest.mark.usefixtures("no_parsing")
@pytest.mark.parametrize("length", [MAX_TOKEN_BYTES + 1, 5_000, 1_000_000])
def test_oversize_token_is_refused_before_parsing(
    tokens: AccessTokens, token: str, length: int
) -> None:
    oversize = _compact_of_length(token, length)
    assert len(oversize) == length
    assert refusal(tokens, oversize) == INVALID


@pytest.mark.usefixtures("no_parsing")
def test_token_at_the_size_limit_reaches_the_parser(tokens: AccessTokens, token: str) -> None:
    """The other side of the boundary, and proof that ``no_parsing`` does catch a parse."""
    with pytest.raises(AssertionError, match="reached the JOSE parser"):
        tokens.verify(_compact_of_length(token, MAX_TOKEN_BYTES), now=NOW)


@pytest.mark.usefixtures("no_parsing")
@pytest.mark.parametrize(
    "shape",
    [
        *(pytest.param(f, id=name) for name, f in NOT_COMPACT.items()),
        *(pytest.param(f, id=name) for name, f in NOT_A_STRING.items()),
        pytest.param(
            lambda t: t + "\n",
            id="trailing-newline",
        ),
    ],
)
def test_non_compact_input_is_refused_before_parsing(
    tokens: AccessTokens, token: str, shape: Callable[[str], object]
) -> None:
    assert refusal(tokens, shape(token)) == INVALID


def _token_of_exact_length(length: int) -> tuple[AccessTokens, str]:
    """A correctly signed token of exactly ``length`` characters, grown through an extra claim.

    A base64url segment never has a length of 4k + 1, so the kid's length is varied too."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    signature_length = len(b64(bytes(64)))
    for kid_length in range(8, 16):
        key = SigningKey(kid="k" * kid_length, created_ms=0, private_key=private_key)
        header = b64(json_bytes(good_header(key)))
        for pad in range(max(0, (length - 400) * 3 // 4), length):
            body = b64(json_bytes(changed(good_claims(), {"pad": "p" * pad})))
            size = len(header) + len(body) + signature_length + 2
            if size == length:
                ring = KeyRing(inline=KeySet(keys=(key,), refresh_secret=bytes(32)).to_json())
                return access_tokens(ring), make_token(key, claims={"pad": "p" * pad})
            if size > length:
                break
    raise AssertionError(f"no token of length {length}")


def test_valid_token_verifies_up_to_the_size_limit_and_not_one_byte_more() -> None:
    tokens, at_limit = _token_of_exact_length(MAX_TOKEN_BYTES)
    assert len(at_limit) == MAX_TOKEN_BYTES
    assert tokens.verify(at_limit, now=NOW) == expected_claims()
    tokens, over = _token_of_exact_length(MAX_TOKEN_BYTES + 1)
    assert len(over) == MAX_TOKEN_BYTES + 1
    assert refusal(tokens, over) == INVALID


# ---------------------------------------------------------------------------------- rotation


class FakeTime:
    """Stands in for the ``time`` module inside ``tether.server.auth.signing_keys``: monotonic time
    moves only when told to; wall time is real (it only stamps new keys)."""

    def __init__(self) -> None:
        self._monotonic = 1_000.0

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds


@pytest.fixture
def mono(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(keys_module, "time", fake)
    return fake


def rotate_in_a_later_tick(path: Path) -> str:
    """:func:`rotate_key_file`, once the file system's timestamps have moved past the file's.

    A :class:`KeyRing` notices a rotation by a changed mtime; two writes within one timestamp
    tick are the subject of ``test_rotation_within_one_mtime_tick_is_noticed``, not of the tests
    that call this."""
    before = path.stat().st_mtime_ns
    probe = path.with_name("mtime-probe")
    deadline = time.monotonic() + 5
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_mtime_ns != before:
            break
        assert time.monotonic() < deadline, "file timestamps do not move"
        time.sleep(0.001)
    probe.unlink()
    return rotate_key_file(path)


def test_previous_key_still_verifies_after_rotation(keyset: KeySet) -> None:
    old = access_tokens(keyset).issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    rotated = keyset.rotated()
    assert rotated.signing_key.kid != keyset.signing_key.kid
    assert rotated.refresh_secret == keyset.refresh_secret
    new_tokens = access_tokens(rotated)
    assert new_tokens.verify(old, now=NOW).user_id == "u"
    fresh = new_tokens.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    assert jwt.get_unverified_header(fresh)["kid"] == rotated.signing_key.kid
    # The set before the rotation does not know the new key.
    assert refusal(access_tokens(keyset), fresh) == INVALID


def test_key_is_dropped_after_max_keys_rotations(keyset: KeySet) -> None:
    old = access_tokens(keyset).issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    current = keyset
    for _ in range(MAX_KEYS - 1):
        current = current.rotated()
        assert access_tokens(current).verify(old, now=NOW).user_id == "u"
    current = current.rotated()
    assert len(current.keys) == MAX_KEYS
    assert current.public_key(keyset.signing_key.kid) is None
    assert refusal(access_tokens(current), old) == INVALID


def test_key_ring_picks_up_a_rotation_made_elsewhere_on_an_unknown_kid(
    tmp_path: Path, mono: FakeTime
) -> None:
    path = tmp_path / "keys.json"
    ring_a = KeyRing(path=path)
    tokens_a = access_tokens(ring_a)
    old = tokens_a.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)

    new_kid = rotate_in_a_later_tick(path)  # as `tether keys rotate` does in another process
    tokens_b = access_tokens(KeyRing(path=path))
    assert tokens_b.keyring.current.signing_key.kid == new_kid
    assert tokens_b.verify(old, now=NOW).user_id == "u"
    fresh = tokens_b.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)

    # Within a second of its last look the ring does not read the file again, even for a kid
    # it does not know: invented kids cannot turn into file reads.
    mono.advance(0.99)
    assert refusal(tokens_a, fresh) == INVALID
    mono.advance(0.01)
    assert tokens_a.verify(fresh, now=NOW).user_id == "u"
    assert ring_a.current.signing_key.kid == new_kid
    assert tokens_a.verify(old, now=NOW).user_id == "u"


def test_key_ring_signs_with_a_rotated_key_within_the_reload_interval(
    tmp_path: Path, mono: FakeTime
) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing(path=path)
    first_kid = ring.current.signing_key.kid
    new_kid = rotate_in_a_later_tick(path)
    mono.advance(RELOAD_INTERVAL - 0.01)
    assert ring.current.signing_key.kid == first_kid
    mono.advance(0.01)
    assert ring.current.signing_key.kid == new_kid
    issued = access_tokens(ring).issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    assert jwt.get_unverified_header(issued)["kid"] == new_kid


def test_key_ring_drops_a_key_rotated_out_in_the_file(tmp_path: Path, mono: FakeTime) -> None:
    path = tmp_path / "keys.json"
    tokens = access_tokens(KeyRing(path=path))
    old = tokens.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    for _ in range(MAX_KEYS - 1):
        rotate_in_a_later_tick(path)
    mono.advance(RELOAD_INTERVAL)
    assert tokens.verify(old, now=NOW).user_id == "u"
    rotate_in_a_later_tick(path)
    mono.advance(RELOAD_INTERVAL)
    assert len(tokens.keyring.current.keys) == MAX_KEYS
    assert refusal(tokens, old) == INVALID


def test_unknown_kids_cost_at_most_one_stat_per_second(
    tmp_path: Path, mono: FakeTime, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = KeyRing(path=tmp_path / "keys.json")
    tokens = access_tokens(ring)
    key = ring.current.signing_key
    stats = 0
    real_stat = ring._stat

    def counting_stat() -> object:
        nonlocal stats
        stats += 1
        return real_stat()

    monkeypatch.setattr(ring, "_stat", counting_stat)
    invented = [make_token(key, {"kid": f"invented-{i}"}) for i in range(50)]
    for forged in invented:
        assert refusal(tokens, forged) == INVALID
    assert stats == 0
    mono.advance(1.0)
    for forged in invented:
        assert refusal(tokens, forged) == INVALID
    assert stats == 1


def test_rotation_within_one_mtime_tick_is_noticed(tmp_path: Path, mono: FakeTime) -> None:
    path = tmp_path / "keys.json"
    tokens_a = access_tokens(KeyRing(path=path))
    before = path.stat()
    rotate_key_file(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick, simulated
    fresh = access_tokens(KeyRing(path=path)).issue(
        user_id="u", session_id="s", now=NOW, expires_at=EXP
    )
    mono.advance(RELOAD_INTERVAL)
    assert tokens_a.verify(fresh, now=NOW).user_id == "u"


def _bump_mtime(path: Path) -> None:
    """Make sure a write is seen as a change, whatever the file system's timestamp tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_text("{"), id="not-json"),
        pytest.param(lambda p: p.write_text(""), id="empty"),
        pytest.param(lambda p: p.write_text('{"keys": []}'), id="no-secret"),
        pytest.param(
            lambda p: p.write_text(
                json.dumps({"refreshSecret": secret_b64(bytes(32)), "keys": [42], "version": 1})
            ),
            id="keys-not-objects",
        ),
    ],
)
def test_damaged_key_file_does_not_stop_verification(
    tmp_path: Path, mono: FakeTime, damage: Callable[[Path], object]
) -> None:
    path = tmp_path / "keys.json"
    tokens = access_tokens(KeyRing(path=path))
    issued = tokens.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    before = path.stat().st_mtime_ns
    damage(path)
    os.utime(path, ns=(before, before + 10**9))
    mono.advance(RELOAD_INTERVAL)
    assert tokens.verify(issued, now=NOW).user_id == "u"
    # It keeps looking: a repaired, rotated file is picked up.
    path.unlink()
    new_kid = rotate_key_file(path)
    _bump_mtime(path)
    mono.advance(RELOAD_INTERVAL)
    assert tokens.keyring.current.signing_key.kid == new_kid


def test_deleted_key_file_does_not_stop_verification(tmp_path: Path, mono: FakeTime) -> None:
    path = tmp_path / "keys.json"
    tokens = access_tokens(KeyRing(path=path))
    issued = tokens.issue(user_id="u", session_id="s", now=NOW, expires_at=EXP)
    path.unlink()
    mono.advance(RELOAD_INTERVAL)
    assert tokens.verify(issued, now=NOW).user_id == "u"
    assert refusal(tokens, make_token(tokens.keyring.current.signing_key, {"kid": "x"})) == INVALID


def test_inline_key_ring_never_touches_the_file_system(keyset: KeySet, mono: FakeTime) -> None:
    ring = KeyRing(inline=keyset.to_json())
    mono.advance(RELOAD_INTERVAL * 10)
    assert ring.current.signing_key.kid == keyset.signing_key.kid
    assert ring.public_key("unknown") is None


def test_key_ring_needs_a_source() -> None:
    with pytest.raises(KeySetError):
        KeyRing()


# ---------------------------------------------------------------------------------- key file


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "keys.json"
    first = load_or_create_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_or_create_key_file(path)
    assert [k.kid for k in second.keys] == [k.kid for k in first.keys]
    assert second.refresh_secret == first.refresh_secret
    rotate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_rotate_key_file_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    kid = rotate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key_file(path).signing_key.kid == kid


def test_key_set_json_round_trip(keyset: KeySet) -> None:
    rotated = keyset.rotated()
    again = KeySet.from_json(rotated.to_json())
    assert [k.kid for k in again.keys] == [k.kid for k in rotated.keys]
    assert [k.created_ms for k in again.keys] == [k.created_ms for k in rotated.keys]
    assert again.refresh_secret == rotated.refresh_secret
    for a, b in zip(again.keys, rotated.keys, strict=True):
        assert a.private_key.private_numbers() == b.private_key.private_numbers()


def _pkcs8(private_key: Any, encryption: Any = None) -> str:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    ).decode()


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], str]:
    """A change to a key-set document: ``value`` (or its result, if callable) at ``path``."""

    def apply(doc: dict[str, Any]) -> str:
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        if value is DROP:
            del target[path[-1]]
        else:
            target[path[-1]] = value() if callable(value) else value
        return json.dumps(doc)

    return apply


def _text(text: str) -> Callable[[dict[str, Any]], str]:
    return lambda doc: text


MALFORMED_KEY_SETS = [
    pytest.param(_text(""), id="empty"),
    pytest.param(_text("{"), id="not-json"),
    pytest.param(_text("null"), id="null"),
    pytest.param(_text("[]"), id="array"),
    pytest.param(_text("42"), id="number"),
    pytest.param(_text('"keys"'), id="string"),
    pytest.param(_set("refreshSecret", value=DROP), id="no-refresh-secret"),
    pytest.param(_set("refreshSecret", value="!!!!"), id="secret-not-base64"),
    pytest.param(_set("refreshSecret", value=12345), id="secret-not-a-string"),
    pytest.param(_set("refreshSecret", value=""), id="secret-empty"),
    pytest.param(_set("refreshSecret", value=secret_b64(bytes(31))), id="secret-31-bytes"),
    pytest.param(_set("keys", value=DROP), id="no-keys"),
    pytest.param(_set("keys", value=[]), id="keys-empty"),
    pytest.param(_set("keys", value=None), id="keys-null"),
    pytest.param(_set("keys", 0, "alg", value="ES384"), id="alg-es384"),
    pytest.param(_set("keys", 0, "alg", value=DROP), id="alg-missing"),
    pytest.param(_set("keys", 0, "privateKey", value=DROP), id="private-key-missing"),
    pytest.param(_set("keys", 0, "privateKey", value="not a pem"), id="private-key-not-pem"),
    pytest.param(
        _set(
            "keys", 0, "privateKey", value=lambda: _pkcs8(ec.generate_private_key(ec.SECP384R1()))
        ),
        id="p384-key",
    ),
    pytest.param(
        _set(
            "keys", 0, "privateKey", value=lambda: _pkcs8(ec.generate_private_key(ec.SECP256K1()))
        ),
        id="secp256k1-key",
    ),
    pytest.param(
        _set("keys", 0, "privateKey", value=lambda: _pkcs8(ed25519.Ed25519PrivateKey.generate())),
        id="ed25519-key",
    ),
    pytest.param(
        _set("keys", 0, "privateKey", value=lambda: _pkcs8(rsa.generate_private_key(65537, 1024))),
        id="rsa-key",
    ),
    pytest.param(
        _set(
            "keys",
            0,
            "privateKey",
            value=lambda: _pkcs8(
                ec.generate_private_key(ec.SECP256R1()),
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
        ),
        id="encrypted-p256-key",
    ),
    pytest.param(
        _set(
            "keys",
            0,
            "privateKey",
            value=lambda: (
                ec.generate_private_key(ec.SECP256R1())
                .public_key()
                .public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                .decode()
            ),
        ),
        id="public-key-pem",
    ),
    pytest.param(_set("keys", 0, "created", value="yesterday"), id="created-not-a-number"),
    pytest.param(_set("keys", 0, "kid", value=DROP), id="kid-missing"),
    pytest.param(
        _set("keys", value=[42]),
        id="key-entry-not-an-object",
    ),
    pytest.param(
        _set("keys", value="abc"),
        id="keys-a-string",
    ),
    pytest.param(
        _set("keys", value={"k": {}}),
        id="keys-an-object",
    ),
    pytest.param(
        _set("keys", 0, "privateKey", value=42),
        id="private-key-not-a-string",
    ),
    pytest.param(
        _set("keys", 0, "kid", value=None),
        id="kid-null",
    ),
    pytest.param(_set("keys", 0, "kid", value=""), id="kid-empty"),
]


@pytest.mark.parametrize("malform", MALFORMED_KEY_SETS)
def test_malformed_key_set_is_refused(
    keyset: KeySet, malform: Callable[[dict[str, Any]], str]
) -> None:
    text = malform(json.loads(keyset.to_json()))
    with pytest.raises(KeySetError):
        KeySet.from_json(text)


def test_refresh_secret_of_32_bytes_is_enough(keyset: KeySet) -> None:
    doc = json.loads(keyset.to_json())
    doc["refreshSecret"] = secret_b64(bytes(range(32)))
    assert KeySet.from_json(json.dumps(doc)).refresh_secret == bytes(range(32))


# ---------------------------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_target() -> tuple[AccessTokens, str, str]:
    """Tokens and a verifier shared by the hypothesis examples (built once: they are pure)."""
    tokens = access_tokens(KeySet.generate())
    ours = tokens.issue(user_id="user-1", session_id="sess-1", now=NOW, expires_at=EXP)
    other = tokens.issue(user_id="admin", session_id="sess-2", now=NOW, expires_at=EXP)
    return tokens, ours, other


def _mutate(data: st.DataObject, token: str, other: str) -> str:
    ops = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=4), label="ops")
    for op in ops:
        n = len(token)
        i = data.draw(st.integers(0, max(n - 1, 0)))
        if op == 0 and n:  # flip one bit of one character (stays ASCII)
            bit = data.draw(st.integers(0, 6))
            token = token[:i] + chr(ord(token[i]) ^ (1 << bit)) + token[i + 1 :]
        elif op == 1 and n:  # replace one character by any character
            token = token[:i] + data.draw(st.characters()) + token[i + 1 :]
        elif op == 2:  # truncate
            token = token[:i]
        elif op == 3:  # delete a run
            token = token[:i] + token[i + data.draw(st.integers(1, 8)) :]
        elif op == 4:  # insert text
            token = token[:i] + data.draw(st.text(max_size=8)) + token[i:]
        elif op == 5:  # permute the segments
            parts = token.split(".")
            token = ".".join(data.draw(st.permutations(parts)))
        elif op == 6:  # splice a segment of another valid token
            parts, theirs = token.split("."), other.split(".")
            j = data.draw(st.integers(0, min(len(parts), len(theirs)) - 1))
            parts[j] = theirs[j]
            token = ".".join(parts)
        elif op == 7:  # duplicate or drop a segment
            parts = token.split(".")
            j = data.draw(st.integers(0, len(parts) - 1))
            if data.draw(st.booleans()):
                parts.insert(j, parts[j])
            else:
                del parts[j]
            token = ".".join(parts)
    return token


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_token_never_verifies(
    fuzz_target: tuple[AccessTokens, str, str], data: st.DataObject
) -> None:
    """Bit flips, replaced, inserted and deleted characters, truncations and segment swaps and
    splices never verify unless they rebuild a valid token, and raise nothing but TokenError.
    (The ECDSA high-s twin is out of reach of random edits: see the test above about it.)"""
    tokens, ours, other = fuzz_target
    mutated = _mutate(data, ours, other)
    # Splicing every segment of the other token (or undoing a change) rebuilds a valid token.
    if mutated in (ours, other):
        expected = "user-1" if mutated == ours else "admin"
        assert tokens.verify(mutated, now=NOW).user_id == expected
    else:
        with pytest.raises(TokenError):
            tokens.verify(mutated, now=NOW)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_binary_mutation_never_verifies(
    fuzz_target: tuple[AccessTokens, str, str], data: st.DataObject
) -> None:
    tokens, ours, _ = fuzz_target
    raw = bytearray(ours.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    as_text = raw.decode("latin-1")
    for candidate in (bytes(raw), as_text):
        if candidate == ours:
            assert tokens.verify(candidate, now=NOW).user_id == "user-1"
        else:
            with pytest.raises(TokenError):
                tokens.verify(candidate, now=NOW)


@settings(max_examples=300, deadline=None)
@given(
    junk=st.one_of(
        st.text(max_size=200),
        st.from_regex(r"\A[A-Za-z0-9_-]{1,60}\.[A-Za-z0-9_-]{1,60}\.[A-Za-z0-9_-]{1,90}\Z"),
        st.binary(max_size=200),
        st.integers(),
        st.none(),
    )
)
def test_arbitrary_input_only_raises_token_error(
    fuzz_target: tuple[AccessTokens, str, str], junk: object
) -> None:
    tokens, _, _ = fuzz_target
    with pytest.raises(TokenError) as caught:
        tokens.verify(junk, now=NOW)
    assert caught.value.code == INVALID
