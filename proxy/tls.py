"""TLS contexts for both sides, from the settings. Errors name the file, never its content."""

from __future__ import annotations

import ssl

from proxy.config import ConfigError, TlsSettings, UpstreamTlsSettings


def _load_chain(context: ssl.SSLContext, cert_file: str, key_file: str | None, what: str) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as error:
        raise ConfigError(f"{what}: no such file: {error.filename or cert_file}") from None
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(
            f"{what}: cannot load certificate {cert_file} / key {key_file or cert_file}: "
            f"{getattr(error, 'reason', None) or error.strerror or error}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca_file: str, what: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such CA file: {ca_file}") from None
    except (ssl.SSLError, OSError) as error:
        raise ConfigError(f"{what}: cannot load CA file {ca_file}: {error}") from None


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """For clients connecting to the proxy; None when TLS is off."""
    if not tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.cert_file, tls.key_file, "tls")
    if tls.ca_file:
        _load_ca(context, tls.ca_file, "tls.ca_file")
    if tls.verify_clients:
        if not tls.ca_file:
            raise ConfigError("tls.verify_clients needs tls.ca_file (the CA that signs clients)")
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: UpstreamTlsSettings) -> ssl.SSLContext:
    """For the proxy's connections to a rediss:// upstream. Verification is on by default."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file:
        _load_ca(context, tls.ca_file, "upstream_tls.ca_file")
    if tls.cert_file:
        _load_chain(context, tls.cert_file, tls.key_file, "upstream_tls")
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
