"""Signing one OCSP response: a PEM key in memory vs. the same key inside SoftHSM2.

Both go through ``sign_response`` (so both include the ``ocsp_signing_seconds``
observation); the token path adds the stand-in signature, the responderID and signature
splice, and the PKCS#11 round trip. Reported as a ratio against the PEM baseline measured
in the same run. Needs the Debian package softhsm2.

    .venv/bin/python benchmarks/signing_keys.py [--count N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from signer.demo_ca import create_ca, write_ca
from signer.issuers import Issuer, issuer_from_certificate, make_responder
from signer.pkcs11_key import Pkcs11Key, parse_pkcs11_uri
from signer.response_builder import CertStatus, ValidityPolicy, sign_response
from tests.softhsm import SoftHSMToken


def per_second(issuer: Issuer, count: int) -> float:
    policy = ValidityPolicy()
    start = time.perf_counter()
    for serial in range(1, count + 1):
        sign_response(issuer, serial, CertStatus.GOOD, policy)
    return count / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000, help="responses per variant")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-signing-"))
    token = SoftHSMToken.create(work / "hsm")
    os.environ.update(token.env)
    for kind in ("p256", "rsa2048"):
        ca = create_ca(kind, f"Bench {kind}")
        write_ca(ca, work / kind)
        token.import_key(work / kind / "responder.key", f"{kind}-ocsp", "0" + str(len(kind)))
        pem = issuer_from_certificate(kind, ca.ca_cert)
        pem.responders.append(
            make_responder(pem, ca.responder_cert, ca.responder_key, delegated=True)
        )
        hsm = issuer_from_certificate(kind, ca.ca_cert)
        key = Pkcs11Key(parse_pkcs11_uri(token.uri(f"{kind}-ocsp"), work))
        hsm.responders.append(make_responder(hsm, ca.responder_cert, key, delegated=True))
        per_second(pem, 50)  # warm up
        per_second(hsm, 50)
        base = per_second(pem, args.count)
        token_rate = per_second(hsm, args.count)
        print(
            f"{kind}: PEM {base:,.0f}/s, SoftHSM2 {token_rate:,.0f}/s, "
            f"token/PEM throughput ratio {token_rate / base:.2f}"
        )


if __name__ == "__main__":
    main()
