"""Secrets kept out of MLflow: the one place that decides what is a secret and masks it.

Every MLflow writer (training runs, ensemble runs, anything that logs params, tags, text or log
messages about them) passes what it writes through this module:

- `scrub(text)`: free text (tags, artifacts, error messages, log lines) with credentials masked;
- `redact(params)`: params, masked by name (the whole value) or by content;
- `redact_tags(tags)`: tags, masked by name (the whole value) or by content, as params are;
- `log_tags(client, run_id, tags)`: tags redacted and set on a run, in one call.

A secret is: a URL's user-info (`s3://KEY:SECRET@bucket`), an AWS access key id, a query
parameter named like a key, token, signature or password, and the value of any environment
variable whose name looks like a credential (AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...), read when
the text is scrubbed, so a variable set later is masked too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from typing import Any

MASK = "***"
PARAM_LIMIT = 6000  # characters MLflow keeps of a param value
TAG_LIMIT = 5000  # ... of a tag value

SECRET_NAME = re.compile(
    r"secret|password|passwd|token|credential|access_key|api_key|private|auth"
    r"|(?:^|[._-])key(?:$|[._-])",
    re.IGNORECASE,
)
URL_USERINFO = re.compile(
    r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@", re.IGNORECASE
)
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{12,}\b")
SECRET_QUERY = re.compile(
    r"(?P<name>[?&;\s](?:[\w.-]*(?:key|token|secret|password|signature|credential)[\w.-]*))"
    r"=(?P<value>[^&\s]+)",
    re.IGNORECASE,
)
MIN_SECRET_LEN = 6  # shorter values of secret variables are too common to mask in text


def secret_values() -> list[str]:
    """Values of secret-named environment variables, longest first (so a value that contains
    another is masked whole)."""
    values = {
        v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LEN
    }
    return sorted(values, key=len, reverse=True)


def has_credentials(url: str) -> bool:
    """Whether `url` carries user-info (`scheme://user:secret@host`)."""
    return URL_USERINFO.search(url) is not None


def scrub(text: Any) -> str:
    """`text` (as a string) with credentials masked: URL user-info, AWS key ids, secret query
    parameters, and any value of a secret environment variable (e.g. AWS_SECRET_ACCESS_KEY)."""
    text = str(text)
    for value in secret_values():
        text = text.replace(value, MASK)
    text = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = AWS_KEY_ID.sub(MASK, text)
    return SECRET_QUERY.sub(lambda m: f"{m['name']}={MASK}", text)


def redact_value(key: str, value: Any) -> str:
    """`value` as text, masked whole if `key` is named like a secret (`api_token`, `password`,
    `db.key`), else scrubbed."""
    return MASK if SECRET_NAME.search(key) else scrub(value)


def redact(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them (strings, at most PARAM_LIMIT characters), secrets masked:
    a secret-named key loses its whole value, any other value is scrubbed."""
    return {key: redact_value(key, value)[:PARAM_LIMIT] for key, value in params.items()}


def redact_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags as MLflow stores them (strings, at most TAG_LIMIT characters), secrets masked as in
    params: a secret-named key loses its whole value, any other is scrubbed; None values are
    left out."""
    return {k: redact_value(k, v)[:TAG_LIMIT] for k, v in tags.items() if v is not None}


def log_tags(
    client: Any, run_id: str, tags: Mapping[str, Any], *, exact: Collection[str] = ()
) -> None:
    """Set `tags` on a run in one request, redacted (`redact_tags`); the keys in `exact` keep
    their values as given (a job's name, which is how the job finds its run again)."""
    from mlflow.entities import RunTag

    safe = {**redact_tags(tags), **{k: str(tags[k]) for k in exact if tags.get(k) is not None}}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in safe.items()])
