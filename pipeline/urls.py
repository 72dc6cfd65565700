"""Store URLs as messages and params may show them: a password in one is found however it is
spelt (SQLAlchemy takes `#` or `/` in it unencoded, or `?password=`), and shown as ***; and
what a URL says about the database it names."""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

PASSWORD_KEYS = ("password", "passwd", "pwd")  # what database drivers read from a URL's query
SCHEME = r"[A-Za-z][A-Za-z0-9+.-]{0,30}://"
URL_IN_TEXT = re.compile(SCHEME + r"[^\s'\"<>]+")  # bounded: linear on any text
# a password SQLAlchemy takes unencoded may hold a quote or a space, which end URL_IN_TEXT's match
# before its @: scheme://user: then up to the @ on the same line (no / between, so a host:port/path
# followed by some address@ further on is left alone)
USERINFO_IN_TEXT = re.compile("(" + SCHEME + r"[^\s:/@'\"<>]{0,200}:)[^@/\n]{1,200}@")


def _database_url(url: str):
    try:  # scripts/demo.py shows pip's indexes with this before SQLAlchemy is installed
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError:
        return None
    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # not one SQLAlchemy reads (databricks://profile:x)
        return None


def in_memory(url: str) -> bool:
    """A SQLite database in memory: each connection gets one of its own."""
    parsed = _database_url(url)
    return parsed is not None and parsed.get_backend_name() == "sqlite" and (
        parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory")


def _this_machine(host: str | None) -> bool:
    """A host that names, from any machine, that machine itself (0.0.0.0 too: a listening address,
    which a client reads as its own machine); no host: a unix socket, or a file."""
    if not host or host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def this_machine_only(url: str) -> bool:
    """Whether no other machine can use the store `url` names: SQLite or a path, or a server on
    a loopback address (127.0.0.1, localhost, ::1) or behind a unix socket (a PostgreSQL URL
    without a host, ?host=/run/postgresql, MySQL's ?unix_socket=)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    if parts.scheme in ("http", "https"):
        return _this_machine(parts.hostname)
    parsed = _database_url(url)
    if parsed is None or parsed.get_backend_name() == "sqlite":
        return True
    # libpq connects to hostaddr when given, else to host, where a path is a socket
    given = parsed.query.get("unix_socket") or parsed.query.get("hostaddr") or parsed.query.get("host")
    given = given[0] if isinstance(given, tuple) else given
    if given:
        return given.startswith("/") or _this_machine(given)
    return _this_machine(parsed.host)


def holds_password(url: str) -> bool:
    parsed = _database_url(url)
    if parsed is not None:
        return parsed.password is not None or any(key in parsed.query for key in PASSWORD_KEYS)
    try:
        return urlsplit(url).password is not None
    except ValueError:  # not a URL at all
        return False


# a query value that grants access: a presigned URL's signature and token (S3's X-Amz-Signature and
# X-Amz-Security-Token, GCS's X-Goog-Signature, an Azure SAS's sig), an API key, a password
SECRET_IN_QUERY = re.compile(r"(^|&)([^=&]{0,60}(?:" + "|".join(("sig", "token", "credential", "secret",
                                                                 r"access[_-]?key", *PASSWORD_KEYS))
                             + r")[^=&]{0,60})=[^&]*", re.IGNORECASE)


def redacted(url: str) -> str:
    """`url` with any password in it as *** (user:***@host, ?password=***); else as given. An
    http(s) URL shows no user at all (***@host): a package index's token is often the user name;
    nor the values of query keys that grant access (a presigned URL's signature)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.scheme in ("http", "https"):
        host = parts.netloc.rpartition("@")[2]
        netloc = f"***@{host}" if "@" in parts.netloc else parts.netloc
        shown = parts._replace(netloc=netloc, query=SECRET_IN_QUERY.sub(r"\1\2=***", parts.query))
        return shown.geturl() if shown != parts else url  # as given when nothing is hidden
    parsed = _database_url(url)
    if parsed is not None:
        hidden = {key: "***" for key in PASSWORD_KEYS if key in parsed.query}
        if parsed.password is None and not hidden:
            return url
        shown = parsed.set(query={**parsed.query, **hidden}).render_as_string(hide_password=True)
        return shown.replace("%2A%2A%2A", "***")  # the query's, as the password's
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}").geturl()


def scrubbed(text: str) -> str:
    """`text` with every URL in it redacted: a message from MLflow, a driver or a refusal of ours
    may quote the store's URL whole (MLflow's "API request to http://user:pw@host/... failed")."""
    def redact(found) -> str:
        url = found.group(0)
        while url and url[-1] in ").,;:]":  # the sentence's punctuation, not the URL's ([::1] keeps its ])
            opener = {")": "(", "]": "["}.get(url[-1])
            if opener and url.count(opener) >= url.count(url[-1]):
                break
            url = url[:-1]
        return redacted(url) + found.group(0)[len(url):]

    return USERINFO_IN_TEXT.sub(r"\1***@", URL_IN_TEXT.sub(redact, text))
