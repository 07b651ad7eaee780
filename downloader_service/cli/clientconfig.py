"""pacifica-cli's INI configuration, found and read as pacifica-cli 0.5.2 reads it for ``download``.

A site's existing ``config.ini`` works unchanged. The values are built in three layers, each
overriding the one before (pacifica-cli's ``generate_global_config``):

1. defaults from the environment: ``DOWNLOAD_URL`` (``https://cartd.example.com``),
   ``DOWNLOAD_POLICY_URL`` (``https://policy.example.com/status/transactions/by_id``),
   ``AUTHENTICATION_TYPE`` (``None``), ``AUTHENTICATION_USERNAME``, ``_PASSWORD``, ``_CERT``,
   ``_KEY``; ``ca_bundle`` is ``True``;
2. the system file: ``/etc/pacifica-cli/config.ini``, else ``<sys.prefix>/pacifica-cli/config.ini``,
   else ``config.ini`` in the current directory -- the first that exists;
3. the user file named by ``--config-ini`` or ``$PACIFICA_CLI_INI`` (default ``config.ini``):
   an absolute path as it is, a bare name under ``~/.pacifica_cli/``.

Then, for ``basic`` authentication, ``AUTHENTICATION_USERNAME`` and ``AUTHENTICATION_PASSWORD``
win over the files. Keys: ``[endpoints] download_url`` (Cartd), ``download_policy_url``
(``GET <it>/<transaction id>``), ``ca_bundle`` (``True``, ``False`` or a CA file);
``[authentication] type`` = ``clientssl`` (``cert``, ``key``), ``basic`` (``username``,
``password``), ``gssapi`` (needs ``requests-gssapi``) or ``None``.

Where pacifica-cli fails with a traceback (an unknown ``ca_bundle``, a missing certificate
file) this raises :class:`InvalidConfigError` naming the file, section and key. Unlike
pacifica-cli, nothing is written: ``~/.pacifica_cli`` is not created.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidConfigError
from ..tls import tls_options

DEFAULT_CONFIG_INI = "config.ini"
AUTH_TYPES = ("clientssl", "basic", "gssapi", "None")
# [section] key -> (environment variable for its default, default), as pacifica-cli sets them.
_DEFAULTS: dict[str, dict[str, tuple[str | None, str]]] = {
    "endpoints": {
        "download_url": ("DOWNLOAD_URL", "https://cartd.example.com"),
        "download_policy_url": (
            "DOWNLOAD_POLICY_URL",
            "https://policy.example.com/status/transactions/by_id",
        ),
        "ca_bundle": (None, "True"),
    },
    "authentication": {
        "type": ("AUTHENTICATION_TYPE", "None"),
        "username": ("AUTHENTICATION_USERNAME", ""),
        "password": ("AUTHENTICATION_PASSWORD", ""),
        "cert": ("AUTHENTICATION_CERT", ""),
        "key": ("AUTHENTICATION_KEY", ""),
    },
}


@dataclass(frozen=True)
class ClientConfig:
    """What ``download`` takes from the configuration: where to go and how to authenticate."""

    download_url: str
    download_policy_url: str
    auth_type: str
    #: ``requests`` keyword arguments for every call to Cartd and Policy (``verify``, ``cert``, ``auth``).
    request_options: dict[str, Any] = field(repr=False)
    #: The files read, in order (none when only defaults and the environment were used).
    files: tuple[str, ...] = ()


def system_config_path(prefix: str | None = None) -> str:
    """pacifica-cli's system file: the first of its two places that exists, else ``config.ini`` here."""
    for folder in ("/etc/pacifica-cli", os.path.join(prefix or sys.prefix, "pacifica-cli")):
        path = os.path.join(folder, DEFAULT_CONFIG_INI)
        if os.path.isfile(path):
            return path
    return DEFAULT_CONFIG_INI


def user_config_path(config_ini: str, home: str | None = None) -> str:
    """pacifica-cli's user file: an absolute ``config_ini`` as it is, else ``~/.pacifica_cli/<it>``."""
    if os.path.isabs(config_ini):
        return config_ini
    return os.path.join(home or os.path.expanduser("~"), ".pacifica_cli", config_ini)


def load_client_config(
    config_ini: str | None = None,
    environ: Mapping[str, str] | None = None,
    system_path: str | None = None,
    home: str | None = None,
) -> ClientConfig:
    """Find and read the configuration as pacifica-cli does; raise :class:`InvalidConfigError`.

    ``config_ini`` is ``--config-ini`` (None: ``$PACIFICA_CLI_INI``, else ``config.ini``);
    ``system_path`` and ``home`` replace the system file's place and the home directory (tests).
    """
    environ = os.environ if environ is None else environ
    name = config_ini or environ.get("PACIFICA_CLI_INI") or DEFAULT_CONFIG_INI
    parser = configparser.ConfigParser()
    for section, keys in _DEFAULTS.items():
        parser.add_section(section)
        for key, (variable, default) in keys.items():
            parser.set(section, key, environ.get(variable, default) if variable else default)
    found = []
    for path in (system_path or system_config_path(), user_config_path(name, home)):
        if os.path.isfile(path):
            _read(parser, path)
            found.append(path)
    where = ", ".join(found) or "the defaults"
    try:
        config = ClientConfig(
            download_url=parser.get("endpoints", "download_url"),
            download_policy_url=parser.get("endpoints", "download_policy_url"),
            auth_type=parser.get("authentication", "type"),
            request_options=_request_options(parser, environ, where),
            files=tuple(found),
        )
    except configparser.Error as exc:  # a bad %-interpolation, as pacifica-cli reads values
        raise InvalidConfigError(f"{where}: {_one_line(exc)}", path=where) from None
    for key in ("download_url", "download_policy_url"):
        value = getattr(config, key)
        if not value.startswith(("http://", "https://")):
            raise InvalidConfigError(
                f"{where}: [endpoints] {key} must be an http:// or https:// URL, not {value!r}",
                field=key,
                path=where,
            )
    return config


def _read(parser: configparser.ConfigParser, path: str) -> None:
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=path)
    except OSError as exc:
        raise InvalidConfigError(f"cannot read {path}: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise InvalidConfigError(f"{path} is not UTF-8 text", path=path) from None
    except configparser.Error as exc:
        raise InvalidConfigError(f"{path} is not a valid INI file: {_one_line(exc)}", path=path) from None


def _request_options(
    parser: configparser.ConfigParser, environ: Mapping[str, str], where: str
) -> dict[str, Any]:
    """pacifica-cli's ``generate_requests_auth``, with every file checked before it is used."""
    auth_type = parser.get("authentication", "type")
    if auth_type not in AUTH_TYPES:
        raise InvalidConfigError(
            f"{where}: [authentication] type must be one of {', '.join(AUTH_TYPES)}, not {auth_type!r}",
            field="type",
            path=where,
        )
    cert = key = None
    options: dict[str, Any] = {}
    if auth_type == "clientssl":
        cert, key = parser.get("authentication", "cert"), parser.get("authentication", "key")
        if not cert:
            raise InvalidConfigError(
                f"{where}: [authentication] type clientssl needs a cert", field="cert", path=where
            )
    elif auth_type == "basic":
        options["auth"] = (
            environ.get("AUTHENTICATION_USERNAME", parser.get("authentication", "username")),
            environ.get("AUTHENTICATION_PASSWORD", parser.get("authentication", "password")),
        )
    elif auth_type == "gssapi":
        options["auth"] = _gssapi_auth(where)
    try:
        options.update(
            tls_options(_ca_bundle(parser.get("endpoints", "ca_bundle"), where), cert, key or None)
        )
    except ValueError as exc:
        raise InvalidConfigError(f"{where}: {exc}", path=where) from None
    return options


def _ca_bundle(value: str, where: str) -> str | bool:
    """``True``, ``False`` or a file, as pacifica-cli's ``verify_type`` takes it."""
    if value in ("True", "False"):
        return value == "True"
    if os.path.isfile(value):
        return value
    raise InvalidConfigError(
        f"{where}: [endpoints] ca_bundle must be True, False or a CA file, not {value!r}",
        field="ca_bundle",
        path=where,
    )


def _gssapi_auth(where: str) -> Any:
    try:
        from requests_gssapi import HTTPSPNEGOAuth  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise InvalidConfigError(
            f"{where}: [authentication] type gssapi needs requests-gssapi: "
            "pip install 'pacifica-downloader-service[gssapi]'",
            field="type",
            path=where,
        ) from None
    return HTTPSPNEGOAuth()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
