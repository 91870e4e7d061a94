#!/usr/bin/env python3
"""Mints test JWTs with Python's `cryptography` and `hmac`, never with the
gateway's own code.

  mint_jwt.py keys DIR
      writes DIR/rsa.pem (RSA 2048), DIR/ec.pem (P-256) and DIR/jwks.json
      (their public keys, kid "r1" and "e1")
  mint_jwt.py sign ALG KEY CLAIMS_JSON [--kid KID] [--header-json JSON]
      prints a token: ALG is HS256 (KEY is the secret), RS256 or ES256 (KEY is
      a PEM private key file), or none
"""
import argparse, base64, hashlib, hmac, json, os, sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def uint(n, size=None):
    size = size or (n.bit_length() + 7) // 8
    return n.to_bytes(size, "big")


def keys(d):
    os.makedirs(d, exist_ok=True)
    r = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e = ec.generate_private_key(ec.SECP256R1())
    for name, k in (("rsa.pem", r), ("ec.pem", e)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    rn = r.public_key().public_numbers()
    en = e.public_key().public_numbers()
    jwks = {"keys": [
        {"kty": "RSA", "kid": "r1", "alg": "RS256", "use": "sig", "n": b64(uint(rn.n)), "e": b64(uint(rn.e))},
        {"kty": "EC", "kid": "e1", "alg": "ES256", "crv": "P-256", "x": b64(uint(en.x, 32)), "y": b64(uint(en.y, 32))},
    ]}
    with open(os.path.join(d, "jwks.json"), "w") as f:
        json.dump(jwks, f)


def sign(alg, key, claims, kid, header_json):
    header = json.loads(header_json) if header_json else {"alg": alg, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing = (b64(json.dumps(header).encode()) + "." + b64(claims.encode())).encode()
    if alg == "none":
        sig = b""
    elif alg == "HS256":
        sig = hmac.new(key.encode(), signing, hashlib.sha256).digest()
    else:
        with open(key, "rb") as f:
            k = serialization.load_pem_private_key(f.read(), password=None)
        if alg == "RS256":
            sig = k.sign(signing, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "ES256":
            r, s = decode_dss_signature(k.sign(signing, ec.ECDSA(hashes.SHA256())))
            sig = uint(r, 32) + uint(s, 32)
        else:
            sys.exit(f"unknown alg {alg}")
    print(signing.decode() + "." + b64(sig))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys")
    k.add_argument("dir")
    s = sub.add_parser("sign")
    s.add_argument("alg")
    s.add_argument("key")
    s.add_argument("claims")
    s.add_argument("--kid")
    s.add_argument("--header-json")
    a = p.parse_args()
    if a.cmd == "keys":
        keys(a.dir)
    else:
        sign(a.alg, a.key, a.claims, a.kid, a.header_json)


if __name__ == "__main__":
    main()
