"""URLs written into outputs keep scheme://host:port/path only."""

from __future__ import annotations

import pytest

from vlm_judge.redact import redact_text, redact_url, redact_urls


@pytest.mark.parametrize("url, expected", [
    ("http://user:pass@gpu-box:8000/v1?api_key=s3cret#frag", "http://gpu-box:8000/v1"),
    ("https://token@api.example.com/v1", "https://api.example.com/v1"),
    ("http://localhost:8000/v1", "http://localhost:8000/v1"),
    ("http://[::1]:9000/v1?x=1", "http://[::1]:9000/v1"),
    ("http://u:p@host:abc/v1?k=v", "http://host:abc/v1"),
    ("not a url", "not a url"),
    ("/a/local/path", "/a/local/path"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_and_nested_values():
    msg = "connection refused (http://alice:pw@10.0.0.2:8000/v1/chat/completions?key=k)"
    assert redact_text(msg) == "connection refused (http://10.0.0.2:8000/v1/chat/completions)"
    d = {"teacher": {"base_url": "http://a:b@h:1/v1", "base_urls": ["http://c:d@h:2/v1?t=1"], "n": 3}}
    assert redact_urls(d) == {"teacher": {"base_url": "http://h:1/v1", "base_urls": ["http://h:2/v1"], "n": 3}}


def test_secret_fields_are_masked_but_their_names_and_look_alikes_are_not():
    from vlm_judge.redact import redact_urls

    got = redact_urls({"backend_args": {"api_key": "sk-123", "max_tokens": 9, "timeout": 30},
                       "api_key_env": "OPENAI_API_KEY", "base_urls": ["http://u:p@h:1/v1?key=x"]})
    assert got == {"backend_args": {"api_key": "***", "max_tokens": 9, "timeout": 30},
                   "api_key_env": "OPENAI_API_KEY", "base_urls": ["http://h:1/v1"]}
