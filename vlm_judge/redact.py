"""URLs made safe to write into outputs: no credentials, no query string, no fragment (and secret
fields of a configuration masked).

A `--base-url` or `teacher.base_url` may carry `user:pass@` or a `?key=...` query; whatever a run
writes (summaries, resolved recipes, drop reasons, logs) keeps only scheme://host:port/path, which
is enough to tell which server answered.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

# scheme://anything up to whitespace, a quote or a closing bracket (how URLs sit inside messages)
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)\]]+")


def redact_url(url: str) -> str:
    """scheme://host:port/path of `url` (user:pass@, ?query and #fragment dropped). A string that is
    not a URL with a scheme and a host comes back unchanged."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # e.g. a non-numeric port: keep only what precedes the authority's oddity
        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/]*@)?([^/?#]*)([^?#]*)", url)
        return f"{m.group(1)}://{m.group(2)}{m.group(3)}" if m else url
    if not parts.scheme or not parts.hostname:
        return url
    host = parts.hostname
    if ":" in host:  # an IPv6 literal needs its brackets back
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (error messages quote the URL they failed on)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


# field names that hold a secret itself (not api_key_env, which names a variable, nor max_tokens)
_SECRET_KEY = re.compile(r"api_?key|(access_|auth_|bearer_)?token|secret|password", re.I)


def redact_urls(obj: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with the URLs in every string redacted,
    and the value of every field whose name says it is a secret (api_key, token, ...) masked."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: "***" if isinstance(k, str) and _SECRET_KEY.fullmatch(k) and v else redact_urls(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_urls(v) for v in obj)
    return obj
