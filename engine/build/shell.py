"""Shell-like words of a Dockerfile: variable substitution and quote removal.

The Dockerfile reference fixes a small shell language for the instructions
that allow substitution (ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL,
USER, VOLUME, WORKDIR, ONBUILD, ARG defaults and some flags):

- `$name` and `${name}`; an unset variable is the empty string;
- `${name:-word}` word when name is unset or empty, `${name-word}` when unset;
- `${name:+word}` word when name is set and not empty, `${name+word}` when set;
- `${name:?msg}` / `${name?msg}`: an error when unset (or empty);
- `${name#pat}`, `${name##pat}`, `${name%pat}`, `${name%%pat}`: prefix and
  suffix removal with a glob;
- `'...'` keeps everything literally; `"..."` expands variables, and the escape
  character escapes only `"`, `$` and itself there; outside quotes the escape
  character makes the next character literal.

expand_word() gives one word (whitespace kept, as ENV values are);
expand_words() splits the result at unquoted whitespace, including whitespace
that an unquoted variable's value brought in (as EXPOSE $PORTS does).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Mapping

from ..errors import DockerfileError

NAME_START = re.compile(r"[A-Za-z_]")
NAME_CHAR = re.compile(r"[A-Za-z0-9_]")
SPACE = " \t\r\n\f\v"


class _Words:
    """Collects characters into words; splitting happens only at unquoted spaces."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.cur: list[str] = []
        self.started = False  # a quoted empty string ("") is still a word

    def char(self, c: str) -> None:
        self.cur.append(c)
        self.started = True

    def raw(self, s: str) -> None:  # quoted text: never split
        self.cur.append(s)
        self.started = True

    def split(self, s: str) -> None:  # an unquoted variable's value
        for c in s:
            if c in SPACE:
                self.blank()
            else:
                self.char(c)

    def blank(self) -> None:
        if self.started:
            self.words.append("".join(self.cur))
        self.cur, self.started = [], False

    def done(self) -> list[str]:
        self.blank()
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str, what: str):
        self.s = text
        self.i = 0
        self.env = env
        self.esc = escape
        self.what = what

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        c = self.peek()
        self.i += 1
        return c

    def run(self, words: _Words, stop: str = "") -> None:
        """Read up to `stop` (consumed) or the end."""
        while self.i < len(self.s):
            c = self.peek()
            if stop and c == stop:
                self.i += 1
                return
            if c == "'":
                self.i += 1
                words.raw(self._single())
            elif c == '"':
                self.i += 1
                words.raw(self._double())
            elif c == "$":
                self.i += 1
                value, quoted = self._dollar()
                if quoted:
                    words.raw(value)
                else:
                    words.split(value)
            elif c == self.esc:
                self.i += 1
                if self.i < len(self.s):
                    words.char(self.take())
            elif c in SPACE:
                self.i += 1
                words.blank()
            else:
                self.i += 1
                words.char(c)
        if stop:
            raise DockerfileError(f"{self.what}: missing '{stop}' in {self.s!r}")

    def text(self, stop: str) -> str:
        """The word inside ${name:-word}: read to `stop` (or the end, for ""), nothing split."""
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                if not stop:
                    return "".join(out)
                raise DockerfileError(f"{self.what}: missing '{stop}' in {self.s!r}")
            c = self.peek()
            if stop and c == stop:
                self.i += 1
                return "".join(out)
            if c == "'":
                self.i += 1
                out.append(self._single())
            elif c == '"':
                self.i += 1
                out.append(self._double())
            elif c == "$":
                self.i += 1
                out.append(self._dollar()[0])
            elif c == self.esc:
                self.i += 1
                if self.i < len(self.s):
                    out.append(self.take())
            else:
                self.i += 1
                out.append(c)

    def _single(self) -> str:
        j = self.s.find("'", self.i)
        if j < 0:
            raise DockerfileError(f"{self.what}: unexpected end of text: missing ' in {self.s!r}")
        out, self.i = self.s[self.i:j], j + 1
        return out

    def _double(self) -> str:
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise DockerfileError(f'{self.what}: unexpected end of text: missing " in {self.s!r}')
            c = self.take()
            if c == '"':
                return "".join(out)
            if c == "$":
                out.append(self._dollar()[0])
            elif c == self.esc:
                n = self.peek()
                if n in ('"', "$", self.esc) and n:
                    out.append(self.take())
                else:
                    out.append(c)
            else:
                out.append(c)

    def _name(self) -> str:
        start = self.i
        while self.i < len(self.s) and NAME_CHAR.match(self.s[self.i]):
            self.i += 1
        return self.s[start:self.i]

    def _dollar(self) -> tuple[str, bool]:
        """After a `$`: the value, and whether it is exempt from splitting."""
        c = self.peek()
        if c == "{":
            self.i += 1
            return self._braced(), False
        if c and NAME_START.match(c):
            return self.env.get(self._name(), ""), False
        if c and c.isdigit():  # $1: positional parameters are not set
            self.i += 1
            return "", False
        return "$", True

    def _braced(self) -> str:
        start = self.i
        name = self._name()
        if not name:
            raise DockerfileError(f"{self.what}: bad substitution in {self.s!r}")
        c = self.take()
        if c == "}":
            return self.env.get(name, "")
        value = self.env.get(name)
        if c == ":":
            op = self.take()
            if op not in "-+?" or not op:
                raise DockerfileError(f"{self.what}: unsupported modifier ':{op}' in ${{{self.s[start:self.i]}...}}")
            word = self.text("}")
            if op == "-":
                return value if value else word
            if op == "+":
                return word if value else ""
            if not value:
                raise DockerfileError(f"{self.what}: {name}: {word or 'is not allowed to be unset or empty'}")
            return value
        if c in "-+?":
            word = self.text("}")
            if c == "-":
                return value if value is not None else word
            if c == "+":
                return word if value is not None else ""
            if value is None:
                raise DockerfileError(f"{self.what}: {name}: {word or 'is not allowed to be unset'}")
            return value
        if c in "#%":
            longest = self.peek() == c
            if longest:
                self.i += 1
            pattern = self.text("}")
            return _trim(value or "", pattern, prefix=c == "#", longest=longest)
        raise DockerfileError(f"{self.what}: unsupported modifier {c!r} in {self.s!r}")


def _trim(value: str, pattern: str, prefix: bool, longest: bool) -> str:
    sizes = range(len(value), -1, -1) if longest else range(len(value) + 1)
    for n in sizes:
        part = value[:n] if prefix else value[len(value) - n:]
        if fnmatch.fnmatchcase(part, pattern):
            return value[n:] if prefix else value[:len(value) - n]
    return value


def expand_word(text: str, env: Mapping[str, str], escape: str = "\\", what: str = "word") -> str:
    """One word, variables substituted and quotes removed; whitespace stays."""
    return _Lexer(text, env, escape, what).text("")


def expand_words(text: str, env: Mapping[str, str], escape: str = "\\", what: str = "word") -> list[str]:
    """Words split at unquoted whitespace after substitution, quotes removed."""
    words = _Words()
    _Lexer(text, env, escape, what).run(words)
    return words.done()


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split at unquoted whitespace, keeping quotes and escapes in the words
    (they are removed when each word is expanded): the parse-time split of
    LABEL, ENV and the whitespace-separated instructions."""
    words: list[str] = []
    cur: list[str] = []
    started = False
    quote = ""
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            cur.append(c)
            if c == quote:
                quote = ""
            elif c == escape and quote != "'" and i + 1 < n:
                i += 1
                cur.append(text[i])
            i += 1
            continue
        if c in SPACE:
            if started:
                words.append("".join(cur))
            cur, started = [], False
        elif c == escape:
            if i + 1 < n:
                cur.extend((c, text[i + 1]))
                started = True
                i += 1
        else:
            if c in "'\"":
                quote = c
            cur.append(c)
            started = True
        i += 1
    if started:
        words.append("".join(cur))
    return words
