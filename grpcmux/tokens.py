"""Token files: which shared secrets admit which client ids.

Both files are YAML and hold only SHA-256 digests (64 hex digits) of tokens, so a
leaked file leaks no credential:

- client tokens (the multiplexer's ``--auth-tokens``) map a client id or a glob
  pattern (``lab-*``) to one digest or a list of digests.  A multiplexer client is
  admitted under an id when the digest of its token is listed under a pattern the id
  matches.
- proxy tokens (``--proxy-auth-tokens``) map a digest to one pattern or a list of
  patterns: the client ids an end user bearing that token may call.

Checks compare against every entry with :func:`hmac.compare_digest`, so their timing
tells nothing about which entry matched or which ids exist.
"""

import hashlib
import hmac
import re
from fnmatch import fnmatchcase

#: The metadata key an end user's proxy token travels in; the proxy strips it.
PROXY_TOKEN_METADATA_KEY = "grpcmux-token"

_DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenFileError(ValueError):
    """A token file cannot be used; ``str(error)`` is one line naming file and entry."""


def hash_token(token):
    """The hex SHA-256 digest of ``token`` (text, UTF-8), as token files store it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _TokenFile:
    """Entries of a token file, checked as :meth:`load` reads them."""

    def __init__(self, entries):
        self._entries = tuple(entries)

    @classmethod
    def load(cls, path):
        """Read ``path``; TokenFileError (one line naming file and entry) if it is bad."""
        data = _load_mapping(path)
        return cls(cls._entry(path, number, key, value)
                   for number, (key, value) in enumerate(data.items(), 1))

    def __len__(self):
        return len(self._entries)


class ClientTokens(_TokenFile):
    """Which token digests admit which client ids, from an ``--auth-tokens`` file.

    Entries: ``(pattern, (digest bytes, ...))`` in file order.
    """

    @staticmethod
    def _entry(path, number, pattern, digests):
        where = f"{path}: entry {pattern!r}"
        return _pattern(pattern, where), _digests(digests, where)

    def admits(self, client_id, token):
        """Whether ``token`` is valid for ``client_id``; an empty token never is."""
        if not token:
            return False
        digest = hash_token(token).encode("ascii")
        admitted = False
        for pattern, digests in self._entries:
            matches = fnmatchcase(client_id, pattern)
            for known in digests:
                admitted |= hmac.compare_digest(known, digest) and matches
        return admitted

    def covers(self, client_id):
        """Whether any entry's pattern matches ``client_id`` (a token protects it)."""
        return any(fnmatchcase(client_id, pattern) for pattern, _ in self._entries)


class ProxyTokens(_TokenFile):
    """Which client ids an end user may call, by token, from ``--proxy-auth-tokens``.

    Entries: ``(digest bytes, (pattern, ...))`` in file order.
    """

    @staticmethod
    def _entry(path, number, digest, patterns):
        where = f"{path}: entry {number}"  # a mistaken key may be a raw token
        (known,) = _digests(digest, where)
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not patterns:
            raise TokenFileError(f"{where}: expected a client id pattern or a list of them")
        return known, tuple(_pattern(p, where) for p in patterns)

    def patterns_for(self, token):
        """The id patterns ``token`` may reach, or ``None`` when it is not known."""
        if not token:
            return None
        digest = hash_token(token).encode("ascii")
        found = None
        for known, patterns in self._entries:
            if hmac.compare_digest(known, digest):
                found = patterns
        return found

    def patterns_in(self, metadata):
        """The id patterns the token of a call may reach, from its metadata ``(key,
        value)`` pairs; ``None`` when it carries no token, more than one, or an unknown one."""
        values = [v for k, v in metadata if k == PROXY_TOKEN_METADATA_KEY]
        if len(values) != 1 or not isinstance(values[0], str):
            return None
        return self.patterns_for(values[0])

    @staticmethod
    def allows(patterns, client_id):
        """Whether ``client_id`` matches one of ``patterns``."""
        return any(fnmatchcase(client_id, pattern) for pattern in patterns)


def _load_mapping(path):
    import yaml

    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.safe_load(stream)
    except OSError as error:
        raise TokenFileError(f"{path}: cannot be read: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise TokenFileError(f"{path}: expected valid YAML: {problem}") from None
    if not isinstance(data, dict) or not data:
        raise TokenFileError(f"{path}: expected a non-empty mapping at the top level")
    return data


def _pattern(value, where):
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise TokenFileError(
            f"{where}: expected a client id or glob pattern, got {value!r}"
        )
    return value


def _digests(value, where):
    values = value if isinstance(value, list) else [value]
    digests = []
    for item in values:
        text = item.lower() if isinstance(item, str) else None
        if text is None or not _DIGEST.fullmatch(text):
            raise TokenFileError(
                f"{where}: expected the SHA-256 hex digest of a token (64 hex digits, "
                "e.g. from `printf %s TOKEN | sha256sum`), not a token or other value"
            )
        digests.append(text.encode("ascii"))
    if not digests:
        raise TokenFileError(f"{where}: expected at least one token digest")
    return tuple(digests)
