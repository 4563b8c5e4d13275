"""URL redaction: passwords and secret query values become ***, everything else is kept."""

import pytest

from snopt._redact import redact_text, redact_url


@pytest.mark.parametrize(
    "url,expected",
    [
        ("postgresql://user:pw@host:5432/db", "postgresql://user:***@host:5432/db"),
        ("postgresql+psycopg2://u:p%40ss@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("mysql://root:@localhost/db", "mysql://root:***@localhost/db"),
        ("http://user@host:5000", "http://user@host:5000"),
        ("https://ghp_0123456789abcdefghijkl@host", "https://***@host"),
        ("https://host/api?token=abc&x=1", "https://host/api?token=***&x=1"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:////abs/path/optuna.db", "sqlite:////abs/path/optuna.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("./mlruns", "./mlruns"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_finds_every_url():
    text = "could not reach postgresql://a:secret@db/x nor http://u:pw@h:1/p; file at /tmp/x"
    out = redact_text(text)
    assert "secret" not in out and ":pw@" not in out
    assert out == "could not reach postgresql://a:***@db/x nor http://u:***@h:1/p; file at /tmp/x"
