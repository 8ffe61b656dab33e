"""Nothing the server shows or logs carries a credential: `mask` takes them out of a text, and
`mask_server_logs` puts the `MaskSecrets` filter on each of the server's loggers."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from llmops.files import mask_secrets

# Tokens of common providers, and bearer tokens, wherever they appear (URI passwords: `mask_secrets`).
_TOKENS = re.compile(
    r"(?P<keep>\bBearer\s+)[^\s\"',]+"
    r"|\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,})"
)
# A logger's filters see only its own records, not its children's: each module that logs is named.
_SERVER_LOGGERS = (
    "llmops.serving.app",
    "llmops.serving.follower",
    "llmops.serving.traffic_log",
    "llmops.modeling",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
)


def mask(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` without credentials: URI passwords (`postgresql://u:***@host`), `?password=` values, bearer and
    provider tokens, and the given `secrets` (the server's own keys) wherever they appear."""
    text = _TOKENS.sub(lambda m: f"{m.group('keep')}***" if m.group("keep") else "***", mask_secrets(text))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class MaskSecrets(logging.Filter):
    """Masks every record of the logger it is on (`mask`): its message, arguments and traceback."""

    def __init__(self, secrets: Sequence[str] = ()):
        super().__init__("mask-secrets")
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments are masked one by one, not merged into the message: formatters such as uvicorn's access log
        # read them. Numbers stay numbers (for %d); anything else becomes its masked text.
        def masked(value: Any) -> Any:
            return value if isinstance(value, int | float) else mask(str(value), self.secrets)

        if isinstance(record.msg, str):
            record.msg = mask(record.msg, self.secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(masked(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: masked(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, self.secrets)
        return True


def mask_server_logs(secrets: Sequence[str] = ()) -> None:
    """Put `MaskSecrets` on each of the server's loggers (a logger's filters see only its own records)."""
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, MaskSecrets)]:
            logger.removeFilter(old)
        logger.addFilter(MaskSecrets(secrets))
