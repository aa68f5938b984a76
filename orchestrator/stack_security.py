"""SeaweedFS's locks for the local stack: what keeps its ports closed to anonymous clients.

`weed mini` runs a master, a volume server, a filer, the S3 gateway and an admin server in one
process; only S3 is the stack's endpoint. Left at their defaults, the filer lists and writes
every object over plain HTTP, answers any web page's cross-origin preflight with `*`, and every
gRPC port takes anonymous calls. Here (docs/security.md has the whole table):

- the filer's and the master's HTTP APIs are off (`-disableHttp`): S3 reaches them over gRPC;
  the admin UI is off (`-admin.ui=false`): the stack never used it;
- the volume server checks a JWT, signed by the master, on every read and write; the filer
  checks its own on every HTTP request (SeaweedFS's `jwt.signing*` keys);
- every gRPC port asks for a client certificate from the stack's own CA (mutual TLS): a
  client without one is cut off in the handshake;
- cross-origin requests are allowed from the S3 endpoint's own origin only, i.e. from no page.

The keys and certificates are made once and kept in the secrets folder with the data, like
the S3 keys. SeaweedFS reads them from WEED_* variables (its documented alternative to a
security.toml), which win over any security.toml it finds.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Callable
from pathlib import Path

# SeaweedFS's settings, as WEED_* variables, for its four JWT signing keys: the volume server's
# write and read keys (signed by the master), and the filer's
JWT_KEYS = {
    "volume-write": "WEED_JWT_SIGNING_KEY",
    "volume-read": "WEED_JWT_SIGNING_READ_KEY",
    "filer-write": "WEED_JWT_FILER_SIGNING_KEY",
    "filer-read": "WEED_JWT_FILER_SIGNING_READ_KEY",
}
# each component's gRPC server (and client: `client` is what S3 and the others dial with)
GRPC_COMPONENTS = ("MASTER", "VOLUME", "FILER", "S3", "ADMIN", "WORKER", "CLIENT")
TLS_FILES = ("ca.pem", "cert.pem", "key.pem")


def weed_lock_flags(cors_origin: str) -> list[str]:
    """`weed mini` flags: the filer's and master's HTTP APIs off, the admin UI off, and
    cross-origin requests from `cors_origin` only."""
    return [
        "-disableHttp",
        "-admin.ui=false",
        f"-s3.allowedOrigins={cors_origin}",
        f"-filer.allowedOrigins={cors_origin}",
    ]


def weed_lock_env(
    secret: Callable[[str, Callable[[], str]], str], tls_dir: Path, cors_origin: str
) -> dict[str, str]:
    """The WEED_* variables that set the signing keys (made by `secret(name, make)`, kept), the
    gRPC certificates (made in `tls_dir` if missing) and the allowed origin."""
    env = {
        var: secret(f"seaweedfs-jwt-{name}", lambda: secrets.token_urlsafe(32))
        for name, var in JWT_KEYS.items()
    }
    ca, cert, key = ensure_tls(tls_dir)
    env["WEED_GRPC_CA"] = str(ca)
    for component in GRPC_COMPONENTS:
        env[f"WEED_GRPC_{component}_CERT"] = str(cert)
        env[f"WEED_GRPC_{component}_KEY"] = str(key)
    env["WEED_CORS_ALLOWED_ORIGINS_VALUES"] = cors_origin
    return env


def ensure_tls(tls_dir: Path) -> tuple[Path, Path, Path]:
    """The stack's CA certificate and one certificate + key it signed, for every SeaweedFS
    component as server and client (SeaweedFS checks the CA, not host names); made once. The
    CA's own key is not kept: a new set is made when any file is missing."""
    paths = tuple(tls_dir / name for name in TLS_FILES)
    if all(p.exists() for p in paths):
        return paths  # type: ignore[return-value]
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = name("resnet local stack CA " + secrets.token_hex(4))
    ca = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=ca_name,
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
        )
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=name("seaweedfs"),
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
        )
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls_dir.mkdir(parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path, data in zip(
        paths, (ca.public_bytes(pem), cert.public_bytes(pem), key_pem), strict=True
    ):
        path.write_bytes(data)
        path.chmod(0o600)
    return paths  # type: ignore[return-value]
