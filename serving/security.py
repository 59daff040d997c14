"""Authentication for the gRPC server: a bearer-token interceptor and TLS credentials.

- `BearerTokenInterceptor`: every method except the exempt ones (health checks by
  default) needs the metadata `authorization: Bearer <token>` with one of the server's
  tokens; other calls fail with UNAUTHENTICATED before the servicer runs.
- `principal`: who sent a call (token, client certificate or connection), the scope of
  client-chosen request ids.
- `server_credentials` / `channel_credentials`: TLS from PEM files, mutual TLS when the
  server is given a client CA.
- `make_test_certificates`: a throwaway CA, server and client certificate (openssl CLI),
  for tests and trying TLS locally; never for production.

Secrets (the token, key files) are never logged or put in error messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import pathlib
import shutil
import subprocess

import grpc

from jaxinfer.errors import ConfigError

log = logging.getLogger(__name__)

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>`, with one of `tokens`, on every method not in
    `exempt`.

    A call without it (or with another token) gets UNAUTHENTICATED; the servicer is never
    invoked. Methods are full names, "/package.Service/Method". Works for all four RPC
    kinds: the refusing handler has the same streaming shape as the real one. Each token is
    its own client identity (see `principal`).
    """

    def __init__(self, *tokens: str, exempt: set[str] | frozenset[str] = HEALTH_METHODS):
        if not tokens or not all(tokens):
            raise ConfigError("a bearer token is empty; give non-empty tokens or turn authentication off")
        self._tokens = tuple(t.encode() for t in tokens)
        self._exempt = frozenset(exempt)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method in self._exempt or token_index(handler_call_details.invocation_metadata,
                                                 self._tokens) is not None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        log.info("rejected unauthenticated call", extra={"method": method})
        return _refusing_handler(handler)


def token_index(metadata, tokens: tuple[bytes, ...]) -> int | None:
    """Which of `tokens` the call's `authorization: Bearer` header carries, or None."""
    found = None
    for key, value in metadata or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip().encode()
        # Compare with every token, even on a wrong scheme, so timing says nothing about
        # which part failed or which token came close.
        for i, token in enumerate(tokens):
            if hmac.compare_digest(credential, token) and scheme.lower() == "bearer" and found is None:
                found = i
    return found


def principal(context, tokens: tuple[bytes, ...] = ()) -> str:
    """Who sent a call: the scope of the request ids a client chooses.

    With bearer tokens, the token ("token#2": the second one configured); else with mutual
    TLS, the client certificate (its common name and a digest of the certificate); else
    the connection ("peer:ipv4:127.0.0.1:50312"), since nothing else tells clients apart.
    A client may look up or abort only requests of its own principal.
    """
    if tokens:
        index = token_index(context.invocation_metadata(), tokens)
        if index is not None:
            return f"token#{index + 1}"
    auth = context.auth_context() or {}
    pem = auth.get("x509_pem_cert")
    if pem:
        name = (auth.get("x509_common_name") or [b"?"])[0].decode("utf-8", "replace")
        return f"cert:{name}/{hashlib.sha256(pem[0]).hexdigest()[:16]}"
    return f"peer:{context.peer()}"


async def _refuse(request_or_iterator, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind whose behaviour aborts with UNAUTHENTICATED."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# ---- TLS ------------------------------------------------------------------------------------


def _read_pem(path, what: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming the file (never its contents) if unusable."""
    if path is None:
        raise ConfigError(f"no {what} file given")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{what} file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} is not a regular file")
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} file {path!r} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(cert_file, key_file, client_ca_file=None) -> grpc.ServerCredentials:
    """TLS for the server from PEM files: its certificate chain and private key.

    With `client_ca_file`, mutual TLS: clients must present a certificate signed by that
    CA (require_client_auth), or the handshake fails.
    """
    cert = _read_pem(cert_file, "TLS certificate")
    key = _read_pem(key_file, "TLS private key")
    if client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    ca = _read_pem(client_ca_file, "TLS client CA")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(ca_file=None, cert_file=None, key_file=None) -> grpc.ChannelCredentials:
    """TLS for a client from PEM files.

    ca_file: the CA that signed the server's certificate (None: the system roots).
    cert_file, key_file: the client's own certificate and key, for mutual TLS (both or neither).
    """
    if (cert_file is None) != (key_file is None):
        raise ConfigError("a TLS client certificate needs its private key and the key its certificate: "
                          "give both or neither")
    ca = _read_pem(ca_file, "TLS CA") if ca_file is not None else None
    cert = _read_pem(cert_file, "TLS client certificate") if cert_file is not None else None
    key = _read_pem(key_file, "TLS client private key") if key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ---- throwaway certificates -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestCertificates:
    """PEM file paths made by `make_test_certificates`."""
    __test__ = False  # not a pytest test class

    ca_cert: pathlib.Path
    server_cert: pathlib.Path  # for localhost, 127.0.0.1 and ::1
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path


def make_test_certificates(directory) -> TestCertificates:
    """Make a CA, a server certificate for localhost/127.0.0.1/::1 and a client
    certificate (P-256 keys, valid 2 days) in `directory`, with the openssl CLI.

    For tests and local trials only: the CA key is left beside the certificates.
    Needs no network.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("make_test_certificates needs the openssl command, which is not on PATH")
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        proc = subprocess.run([openssl, *args], cwd=d, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")

    def key(name: str) -> None:
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name)

    key("ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj", "/CN=jaxinfer test CA",
        "-out", "ca.pem")
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "localhost"), ("client", "jaxinfer test client")):
        key(f"{name}.key")
        run("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return TestCertificates(ca_cert=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
                            client_cert=d / "client.pem", client_key=d / "client.key")
