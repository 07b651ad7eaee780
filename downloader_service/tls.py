"""Outbound TLS options -- a CA bundle and a client certificate -- checked before any request uses them.

Cartd and Policy may sit behind a TLS terminator that requires a client certificate (mutual
TLS) or serves a site CA's certificate. ``requests`` takes these as ``verify`` and ``cert``,
but reports a missing or unloadable file only at the first request, as an ``OSError`` or an
SSL error deep in urllib3. :func:`tls_options` loads each file with :mod:`ssl` first, so a
wrong path, a key that does not match its certificate or a file that is not PEM is one
``ValueError`` naming the file, at start.
"""

from __future__ import annotations

import os
import ssl
from typing import Any


def tls_options(
    ca_bundle: str | bool | None = None, client_cert: str | None = None, client_key: str | None = None
) -> dict[str, Any]:
    """``requests`` keyword arguments (``verify``, ``cert``) for these options, each file checked.

    ``ca_bundle`` is a PEM file or a directory of hashed certificates (``c_rehash``) to trust
    instead of the system's, ``False`` to skip verification, ``True``/``None`` for the
    default. ``client_cert`` is a PEM certificate (with its key, unless ``client_key`` names
    the key's file). Raises ``ValueError`` naming the file and what is wrong with it.
    """
    options: dict[str, Any] = {}
    if ca_bundle is False:
        options["verify"] = False
    elif isinstance(ca_bundle, str) and ca_bundle:
        check_ca_bundle(ca_bundle)
        options["verify"] = ca_bundle
    if client_key and not client_cert:
        raise ValueError(f"a client key ({client_key}) needs its certificate")
    if client_cert:
        check_client_cert(client_cert, client_key or None)
        options["cert"] = (client_cert, client_key) if client_key else client_cert
    return options


def check_ca_bundle(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a CA file (or directory) :mod:`ssl` can load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if os.path.isdir(path):
            context.load_verify_locations(capath=path)
        else:
            context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"the CA bundle {path} does not exist") from None
    except PermissionError:
        raise ValueError(f"the CA bundle {path} cannot be read (permission denied)") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ValueError(f"the CA bundle {path} holds no PEM certificate ({_reason(exc)})") from None


def check_client_cert(cert: str, key: str | None = None) -> None:
    """Raise ``ValueError`` unless ``cert`` (and ``key``) load as a certificate and its private key."""
    for path in (cert, key):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"the client certificate file {path} does not exist")
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"the client certificate file {path} cannot be read (permission denied)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        files = f"{cert} and {key}" if key else cert
        raise ValueError(
            f"the client certificate {files} cannot be used: {_reason(exc)} "
            "(a PEM certificate and its unencrypted private key)"
        ) from None


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason (``KEY_VALUES_MISMATCH``) in words, or the exception's own text."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason.replace("_", " ").lower()
    return str(exc) or type(exc).__name__
