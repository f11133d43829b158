"""Our access tokens verify in independent JOSE implementations given only the JWKS document.

A third party (an API behind Tether's sign-in, a gateway) sees nothing but what
``/.well-known/jwks.json`` serves: ``KeySet.jwks()`` as JSON. joserfc is the main witness; PyJWT's
own JWKS loader is a second one, independent of the ``public_key`` objects Tether verifies with.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from joserfc import jwt as jose_jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidKeyIdError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet as JoseKeySet
from tether.server.auth.signing_keys import MAX_KEYS, KeyRing, KeySet
from tether.server.auth.tokens import AccessTokens

ISSUER = "https://tether.test"
AUDIENCE = "tether-test"
LEEWAY = 5
NOW = 1_700_000_000
EXP = NOW + 600


def served_jwks(keyset: KeySet) -> dict[str, Any]:
    """The JWKS document as a client receives it: serialised to JSON and parsed back."""
    parsed: dict[str, Any] = json.loads(json.dumps(keyset.jwks()))
    return parsed


def issue(keyset: KeySet, *, user_id: str = "user-1") -> str:
    tokens = AccessTokens(
        KeyRing(inline=keyset.to_json()), issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY
    )
    return tokens.issue(user_id=user_id, session_id="sess-1", now=NOW, expires_at=EXP)


def joserfc_verify(
    token: str, jwks: dict[str, Any], *, now: int = NOW, algorithms: tuple[str, ...] = ("ES256",)
) -> jose_jwt.Token:
    """Verify as a careful third party would: pinned algorithms, every contract claim essential."""
    decoded = jose_jwt.decode(token, JoseKeySet.import_key_set(jwks), algorithms=list(algorithms))
    registry = jose_jwt.JWTClaimsRegistry(
        now=now,
        leeway=LEEWAY,
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": AUDIENCE},
        sub={"essential": True},
        sid={"essential": True},
        iat={"essential": True},
        exp={"essential": True},
        jti={"essential": True},
    )
    registry.validate(decoded.claims)
    return decoded


@pytest.fixture
def keyset() -> KeySet:
    return KeySet.generate()


def test_joserfc_verifies_our_token_from_the_jwks_alone(keyset: KeySet) -> None:
    token = issue(keyset)
    decoded = joserfc_verify(token, served_jwks(keyset))
    assert decoded.header == {"alg": "ES256", "typ": "at+jwt", "kid": keyset.signing_key.kid}
    claims = decoded.claims
    assert (claims["iss"], claims["aud"], claims["sub"], claims["sid"]) == (
        ISSUER,
        AUDIENCE,
        "user-1",
        "sess-1",
    )
    assert (claims["iat"], claims["exp"]) == (NOW, EXP)
    assert isinstance(claims["jti"], str) and claims["jti"]


def test_joserfc_applies_expiry_to_our_token(keyset: KeySet) -> None:
    """The claims are standard enough for a stock validator: exp is enforced there too."""
    with pytest.raises(ExpiredTokenError):
        joserfc_verify(issue(keyset), served_jwks(keyset), now=EXP + LEEWAY + 1)


def test_joserfc_refuses_a_tampered_token(keyset: KeySet) -> None:
    header, _, signature = issue(keyset).split(".")
    _, payload, _ = issue(keyset, user_id="admin").split(".")
    with pytest.raises(BadSignatureError):
        joserfc_verify(f"{header}.{payload}.{signature}", served_jwks(keyset))


def test_joserfc_follows_rotation(keyset: KeySet) -> None:
    old = issue(keyset)
    current = keyset
    for _ in range(MAX_KEYS - 1):
        current = current.rotated()
        # Still published, so still verifiable by a third party …
        assert joserfc_verify(old, served_jwks(current)).claims["sub"] == "user-1"
        # … and so is a token the new signing key makes.
        assert joserfc_verify(issue(current), served_jwks(current)).header["kid"] == (
            current.signing_key.kid
        )
    current = current.rotated()
    with pytest.raises(InvalidKeyIdError):
        joserfc_verify(old, served_jwks(current))


def test_pyjwt_jwks_loader_verifies_our_token(keyset: KeySet) -> None:
    current = keyset.rotated()
    token = issue(current)
    jwk_set = jwt.PyJWKSet.from_dict(served_jwks(current))
    key = jwk_set[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "user-1"


def test_jwks_publishes_only_public_p256_signing_keys(keyset: KeySet) -> None:
    current = keyset.rotated().rotated()
    document = served_jwks(current)
    assert list(document) == ["keys"]
    assert [k["kid"] for k in document["keys"]] == [k.kid for k in current.keys]
    for jwk in document["keys"]:
        # No "d": the private scalar never leaves the key file.
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")


# ---------------------------------------------------------------------------------- RS256


@pytest.fixture(scope="module")
def rs_keyset() -> KeySet:
    return KeySet.generate("RS256")


def test_joserfc_verifies_our_rs256_token_from_the_jwks_alone(rs_keyset: KeySet) -> None:
    token = issue(rs_keyset)
    decoded = joserfc_verify(token, served_jwks(rs_keyset), algorithms=("RS256",))
    assert decoded.header == {"alg": "RS256", "typ": "at+jwt", "kid": rs_keyset.signing_key.kid}
    assert (decoded.claims["sub"], decoded.claims["exp"]) == ("user-1", EXP)
    # Pinned to ES256 alone, the same verifier refuses it.
    with pytest.raises(UnsupportedAlgorithmError):
        joserfc_verify(token, served_jwks(rs_keyset), algorithms=("ES256",))


def test_joserfc_refuses_a_tampered_rs256_token(rs_keyset: KeySet) -> None:
    header, _, signature = issue(rs_keyset).split(".")
    _, payload, _ = issue(rs_keyset, user_id="admin").split(".")
    with pytest.raises(BadSignatureError):
        joserfc_verify(
            f"{header}.{payload}.{signature}", served_jwks(rs_keyset), algorithms=("RS256",)
        )


def test_third_parties_verify_both_algorithms_during_a_migration() -> None:
    """ES256 set rotated to RS256: one JWKS serves both keys; joserfc (allowing both, choosing
    by kid) and PyJWT's JWKS loader verify the old ES256 token and the new RS256 one."""
    start = KeySet.generate("ES256")
    old = issue(start)
    current = start.rotated("RS256")
    new = issue(current)
    jwks = served_jwks(current)
    assert [k["alg"] for k in jwks["keys"]] == ["RS256", "ES256"]
    for token, alg in ((old, "ES256"), (new, "RS256")):
        assert joserfc_verify(token, jwks, algorithms=("ES256", "RS256")).header["alg"] == alg
        key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
        assert key.algorithm_name == alg
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims["sub"] == "user-1"


def test_jwks_publishes_only_public_rsa_keys(rs_keyset: KeySet) -> None:
    (jwk,) = served_jwks(rs_keyset)["keys"]
    # No "d", "p", "q", "dp", "dq", "qi": the private parts never leave the key file.
    assert set(jwk) == {"kty", "n", "e", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["alg"], jwk["use"], jwk["e"]) == ("RSA", "RS256", "sig", "AQAB")
    assert jwk["kid"] == rs_keyset.signing_key.kid
