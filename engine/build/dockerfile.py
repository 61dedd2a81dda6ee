"""The Dockerfile parser: text -> typed instructions, each with its file and line.

The language is the one the BuildKit Dockerfile reference fixes (docker and
buildah read the same):

- parser directives (`# syntax=`, `# escape=`, `# check=`) only at the very top,
  before any comment, blank line or instruction; unknown ones are comments;
- instructions in any case; `\\` (or the escape character) at the end of a line
  continues it; comment lines and blank lines inside a continuation are
  dropped; a `#` elsewhere than at a line's start is no comment;
- flags (`--from=x`) before the arguments; shell form or JSON (exec) form;
- here-documents for RUN, COPY and ADD (`<<EOT`, `<<-EOT` strips leading tabs,
  a quoted delimiter turns substitution off).

Parsing does no variable substitution: the words keep their quotes and `$`
references, and the builder expands them with the build's args and env at
the step that uses them (engine/build/shell.py), in the instructions that
allow it.  Every instruction keeps `original`, its text as written with
continuations joined, which is what the image history records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..errors import DockerfileError
from .shell import split_words

DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
KNOWN_DIRECTIVES = ("syntax", "escape", "check")
HEREDOC = re.compile(r"^(\d*)<<(-?)(.+)$")
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")
DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000,
                  "h": 3_600_000_000_000}

# The flags each instruction takes; True: a boolean flag (--link, --link=false).
FLAGS: dict[str, dict[str, bool]] = {
    "FROM": {"platform": False},
    "RUN": {"mount": False, "network": False, "security": False},
    "COPY": {"from": False, "chown": False, "chmod": False, "link": True, "parents": True, "exclude": False},
    "ADD": {"chown": False, "chmod": False, "link": True, "checksum": False, "keep-git-dir": True,
            "exclude": False, "unpack": True},
    "HEALTHCHECK": {"interval": False, "timeout": False, "start-period": False, "start-interval": False,
                    "retries": False},
}
REPEATABLE = {"mount", "exclude"}


@dataclass
class Heredoc:
    name: str  # the delimiter
    content: str  # the body, every line ending in a newline (leading tabs stripped for <<-)
    expand: bool  # an unquoted delimiter: $ substitution applies to the body
    fd: int | None = None  # 2<<EOT


@dataclass(kw_only=True)
class Instruction:
    keyword: str  # upper case
    line: int  # first line, 1-based
    end_line: int
    original: str  # as written, continuations joined (no heredoc bodies)
    args: str = ""  # the text after the keyword and its flags
    flags: dict[str, list[str]] = field(default_factory=dict)
    heredocs: list[Heredoc] = field(default_factory=list)

    def flag(self, name: str, default: str | None = None) -> str | None:
        v = self.flags.get(name)
        return v[-1] if v else default

    def bool_flag(self, name: str) -> bool:
        v = self.flag(name)
        if v is None:
            return False
        if v.lower() in ("", "true", "1"):
            return True
        if v.lower() in ("false", "0"):
            return False
        raise DockerfileError(f"--{name}={v}: expected true or false", line=self.line)


@dataclass(kw_only=True)
class From(Instruction):
    image: str  # a word (substitution applies, with the global args)
    stage_name: str | None = None  # lower case

    @property
    def platform(self) -> str | None:
        return self.flag("platform")


@dataclass(kw_only=True)
class CommandInstruction(Instruction):
    """RUN, CMD, ENTRYPOINT: shell form (`command` a string) or exec form (a list)."""

    command: str | list[str]

    @property
    def exec_form(self) -> bool:
        return isinstance(self.command, list)


class Run(CommandInstruction):
    @property
    def mounts(self) -> list[str]:
        return self.flags.get("mount", [])

    @property
    def network(self) -> str | None:
        return self.flag("network")


class Cmd(CommandInstruction):
    pass


class Entrypoint(CommandInstruction):
    pass


@dataclass(kw_only=True)
class Shell(Instruction):
    shell: list[str]


@dataclass(kw_only=True)
class KeyValues(Instruction):
    """ENV and LABEL: (key, value) pairs of unexpanded words."""

    pairs: list[tuple[str, str]]
    legacy: bool = False  # `ENV key value`


class Env(KeyValues):
    pass


class Label(KeyValues):
    pass


@dataclass(kw_only=True)
class Maintainer(Instruction):
    name: str


@dataclass(kw_only=True)
class Expose(Instruction):
    ports: list[str]  # words


@dataclass(kw_only=True)
class Volume(Instruction):
    paths: list[str]  # words (JSON form: already literal)
    json_form: bool = False


@dataclass(kw_only=True)
class User(Instruction):
    user: str  # a word


@dataclass(kw_only=True)
class Workdir(Instruction):
    path: str  # a word


@dataclass(kw_only=True)
class Arg(Instruction):
    names: list[tuple[str, str | None]]  # (name, default word or None)


@dataclass(kw_only=True)
class Stopsignal(Instruction):
    signal: str  # a word


@dataclass(kw_only=True)
class Healthcheck(Instruction):
    test: list[str]  # ["NONE"], ["CMD", ...], ["CMD-SHELL", "cmd"]
    interval: int = 0  # nanoseconds; 0: not set
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(kw_only=True)
class Onbuild(Instruction):
    trigger: Instruction
    trigger_text: str  # what the config's OnBuild records


@dataclass(kw_only=True)
class CopyBase(Instruction):
    """COPY and ADD: sources and a destination, words (JSON form: literal)."""

    sources: list[str]
    dest: str
    json_form: bool = False

    @property
    def chown(self) -> str | None:
        return self.flag("chown")

    @property
    def chmod(self) -> str | None:
        return self.flag("chmod")

    @property
    def link(self) -> bool:
        return self.bool_flag("link")

    @property
    def excludes(self) -> list[str]:
        return self.flags.get("exclude", [])

    def heredoc(self, source: str) -> Heredoc | None:
        """The here-document a source word names (`<<EOF`), if any."""
        m = HEREDOC.match(source)
        if not m:
            return None
        name = _unquote(m.group(3))[0]
        return next((h for h in self.heredocs if h.name == name), None)


class Copy(CopyBase):
    @property
    def from_(self) -> str | None:
        return self.flag("from")

    @property
    def parents(self) -> bool:
        return self.bool_flag("parents")


class Add(CopyBase):
    @property
    def checksum(self) -> str | None:
        return self.flag("checksum")

    @property
    def keep_git_dir(self) -> bool:
        return self.bool_flag("keep-git-dir")


@dataclass
class Stage:
    index: int
    name: str | None
    from_: From
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: str
    directives: dict[str, str]
    escape: str
    global_args: list[Arg]  # ARGs before the first FROM
    stages: list[Stage]
    instructions: list[Instruction]  # all of them, in order

    def stage(self, ref: str) -> Stage | None:
        """A stage by name (case-insensitive) or index."""
        low = ref.lower()
        for s in self.stages:
            if s.name == low:
                return s
        if ref.isdigit() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None


# Reading lines --------------------------------------------------------------------


def parse(text: str | bytes, path: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile.  Errors name the file and line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DockerfileError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    directives: dict[str, str] = {}
    i = 0
    while i < len(lines):
        m = DIRECTIVE.match(lines[i])
        if not m or m.group(1).lower() not in KNOWN_DIRECTIVES:
            break
        key = m.group(1).lower()
        if key in directives:
            raise DockerfileError(f"only one {key} parser directive can be used", path, i + 1)
        directives[key] = m.group(2)
        i += 1
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"invalid escape token '{escape}' does not match ` or \\", path, 1)
    cont = re.compile(re.escape(escape) + r"[ \t]*$")
    instructions: list[Instruction] = []
    try:
        while i < len(lines):
            stripped = lines[i].lstrip(" \t")
            if not stripped or stripped.startswith("#"):
                i += 1
                continue
            start = i
            text_ = stripped
            ended = not cont.search(text_)
            if not ended:
                text_ = cont.sub("", text_)
            i += 1
            while not ended and i < len(lines):
                nxt = lines[i]
                i += 1
                if nxt.lstrip(" \t").startswith("#") or not nxt.strip():
                    continue
                ended = not cont.search(nxt)
                text_ += nxt if ended else cont.sub("", nxt)
            try:
                ins, i = _instruction(text_, start + 1, i, lines, escape)
            except DockerfileError as e:
                raise e.at(path, start + 1) from None
            instructions.append(ins)
    except DockerfileError as e:
        raise e.at(path, None) from None
    return _stages(path, directives, escape, instructions)


def _stages(path: str, directives: dict[str, str], escape: str, instructions: list[Instruction]) -> Dockerfile:
    global_args: list[Arg] = []
    stages: list[Stage] = []
    for ins in instructions:
        if isinstance(ins, From):
            if ins.stage_name and any(s.name == ins.stage_name for s in stages):
                raise DockerfileError(f"duplicate stage name {ins.stage_name!r}", path, ins.line)
            stages.append(Stage(len(stages), ins.stage_name, ins))
        elif not stages:
            if not isinstance(ins, Arg):
                raise DockerfileError(f"{ins.keyword} before the first FROM: only ARG may come before it",
                                      path, ins.line)
            global_args.append(ins)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise DockerfileError("no FROM instruction: nothing to build" if instructions else "the file holds no instructions",
                              path)
    return Dockerfile(path, directives, escape, global_args, stages, instructions)


# One instruction --------------------------------------------------------------------


def _instruction(text: str, line: int, i: int, lines: list[str], escape: str,
                 onbuild: bool = False) -> tuple[Instruction, int]:
    """Parse one logical line; returns it and the index of the next line (after any heredoc bodies)."""
    text = text.strip()
    m = re.match(r"(\S+)(?:[ \t]+(.*))?$", text, re.S)
    assert m is not None  # text is not blank
    word, rest = m.group(1), (m.group(2) or "").strip()
    keyword = word.upper()
    if keyword not in PARSERS:
        raise DockerfileError(f"unknown instruction: {word}")
    if onbuild and keyword in ("ONBUILD", "FROM", "MAINTAINER"):
        raise DockerfileError(f"{keyword} isn't allowed as an ONBUILD trigger")
    base: dict = {"keyword": keyword, "line": line, "end_line": i, "original": text}
    if keyword == "ONBUILD":
        if not rest:
            raise DockerfileError("ONBUILD requires at least one argument")
        trigger, i = _instruction(rest, line, i, lines, escape, onbuild=True)
        base["end_line"] = trigger.end_line
        return Onbuild(**base, args=rest, trigger=trigger, trigger_text=rest), i
    flags, rest = _flags(keyword, rest)
    base.update(args=rest, flags=flags)
    heredocs: list[Heredoc] = []
    if keyword in ("RUN", "COPY", "ADD") and "<<" in rest:
        heredocs, i = _read_heredocs(rest, escape, lines, i)
        base["end_line"] = i
    base["heredocs"] = heredocs
    return PARSERS[keyword](base, rest, escape), i


def _flags(keyword: str, rest: str) -> tuple[dict[str, list[str]], str]:
    """Leading `--name[=value]` words; returns them and the text after them."""
    allowed = FLAGS.get(keyword, {})
    flags: dict[str, list[str]] = {}
    while rest.startswith("--"):
        m = re.match(r"--([A-Za-z0-9-]*)(?:=((?:\"[^\"]*\"|'[^']*'|\\.|[^ \t\\])*))?(?:[ \t]+|$)", rest)
        if m is None:
            raise DockerfileError(f"{keyword}: cannot parse the flag in {rest.split()[0]!r}")
        name, value = m.group(1), m.group(2)
        rest = rest[m.end():]
        if name == "" and value is None:
            break  # `--` ends the flags
        if name not in allowed:
            raise DockerfileError(f"{keyword}: unknown flag: --{name}")
        if value is None:
            if not allowed[name]:
                raise DockerfileError(f"{keyword}: missing a value on flag: --{name}")
            value = ""
        value = _unquote(value)[0]
        if name in flags and name not in REPEATABLE:
            raise DockerfileError(f"{keyword}: duplicate flag specified: --{name}")
        flags.setdefault(name, []).append(value)
    return flags, rest


def _unquote(word: str) -> tuple[str, bool]:
    """Quotes and escapes removed (no substitution); and whether any quote was there."""
    out: list[str] = []
    quoted = False
    i = 0
    quote = ""
    while i < len(word):
        c = word[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(word):
                i += 1
                out.append(word[i])
            else:
                out.append(c)
        elif c in "'\"":
            quote, quoted = c, True
        elif c == "\\" and i + 1 < len(word):
            i += 1
            out.append(word[i])
            quoted = True
        else:
            out.append(c)
        i += 1
    return "".join(out), quoted


def _read_heredocs(rest: str, escape: str, lines: list[str], i: int) -> tuple[list[Heredoc], int]:
    """The bodies of the here-documents the line names, read from the lines that follow it."""
    docs: list[Heredoc] = []
    for w in split_words(rest, escape):
        m = HEREDOC.match(w)
        if not m:
            continue
        name, quoted = _unquote(m.group(3))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            continue  # `<<<` or an odd word: not a here-document
        chomp = m.group(2) == "-"
        body: list[str] = []
        while True:
            if i >= len(lines):
                raise DockerfileError(f"unterminated heredoc {name!r}: no line {name!r} ends it")
            ln = lines[i]
            i += 1
            if chomp:
                ln = ln.lstrip("\t")
            if ln == name:
                break
            body.append(ln + "\n")
        docs.append(Heredoc(name, "".join(body), expand=not quoted, fd=int(m.group(1)) if m.group(1) else None))
    return docs, i


def parse_json_array(text: str) -> list[str] | None:
    """The exec form: a JSON array of strings, else None (then it is the shell form)."""
    if not text.startswith("["):
        return None
    try:
        v = json.loads(text)
    except ValueError:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return None
    return v


def _need(keyword: str, rest: str) -> None:
    if not rest:
        raise DockerfileError(f"{keyword} requires at least one argument")


def _from(base: dict, rest: str, esc: str) -> From:
    words = split_words(rest, esc)
    if len(words) == 1:
        return From(**base, image=words[0])
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not STAGE_NAME.match(name):
            raise DockerfileError(f"invalid name for build stage: {words[2]!r}: it must start with a letter and"
                                  " hold only letters, digits and _ . -")
        return From(**base, image=words[0], stage_name=name)
    raise DockerfileError("FROM requires either one argument, or three: FROM <image> [AS <name>]")


def _command(cls):
    def parse_(base: dict, rest: str, esc: str):
        _need(base["keyword"], rest)
        cmd = parse_json_array(rest)
        return cls(**base, command=cmd if cmd is not None else rest)
    return parse_


def _shell(base: dict, rest: str, esc: str) -> Shell:
    _need("SHELL", rest)
    cmd = parse_json_array(rest)
    if not cmd:
        raise DockerfileError("SHELL requires the arguments to be in JSON form, as [\"executable\", \"parameters\"]")
    return Shell(**base, shell=cmd)


def _key_values(cls):
    def parse_(base: dict, rest: str, esc: str):
        keyword = base["keyword"]
        words = split_words(rest, esc)
        if not words:
            raise DockerfileError(f"{keyword} requires at least one argument")
        if "=" not in words[0]:
            parts = re.split(r"[ \t]+", rest, maxsplit=1)
            if len(parts) < 2:
                raise DockerfileError(f"{keyword} must have two arguments: {keyword} <key>=<value>")
            return cls(**base, pairs=[(parts[0], parts[1])], legacy=True)
        pairs = []
        for w in words:
            if "=" not in w:
                raise DockerfileError(f"{keyword}: can't find = in {w!r}: it must be of the form name=value")
            k, v = w.split("=", 1)
            if not k:
                raise DockerfileError(f"{keyword}: empty name in {w!r}")
            pairs.append((k, v))
        return cls(**base, pairs=pairs)
    return parse_


def _maintainer(base: dict, rest: str, esc: str) -> Maintainer:
    _need("MAINTAINER", rest)
    return Maintainer(**base, name=rest)


def _expose(base: dict, rest: str, esc: str) -> Expose:
    _need("EXPOSE", rest)
    return Expose(**base, ports=split_words(rest, esc))


def _volume(base: dict, rest: str, esc: str) -> Volume:
    _need("VOLUME", rest)
    js = parse_json_array(rest)
    if js is not None:
        if not js:
            raise DockerfileError("VOLUME requires at least one argument")
        return Volume(**base, paths=js, json_form=True)
    return Volume(**base, paths=split_words(rest, esc))


def _one(cls, attr: str):
    def parse_(base: dict, rest: str, esc: str):
        _need(base["keyword"], rest)
        return cls(**base, **{attr: rest})
    return parse_


def _arg(base: dict, rest: str, esc: str) -> Arg:
    words = split_words(rest, esc)
    if not words:
        raise DockerfileError("ARG requires at least one argument")
    names: list[tuple[str, str | None]] = []
    for w in words:
        name, eq, default = w.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DockerfileError(f"ARG: invalid name {name!r}")
        names.append((name, default if eq else None))
    return Arg(**base, names=names)


def parse_duration(text: str, what: str) -> int:
    """A Go duration (`30s`, `1m30s`, `100ms`) in nanoseconds."""
    if text == "0":
        return 0
    pos, total = 0, 0.0
    for m in DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise DockerfileError(f"{what}: not a duration: {text!r} (write e.g. 30s, 1m30s, 500ms)")
    return int(total)


def _healthcheck(base: dict, rest: str, esc: str) -> Healthcheck:
    _need("HEALTHCHECK", rest)
    word, _, cmd = rest.partition(" ")
    word = word.upper()
    cmd = cmd.strip()
    flags = base["flags"]
    if word == "NONE":
        if cmd:
            raise DockerfileError("HEALTHCHECK NONE takes no arguments")
        if flags:
            raise DockerfileError("HEALTHCHECK NONE takes no options")
        return Healthcheck(**base, test=["NONE"])
    if word != "CMD":
        raise DockerfileError(f"HEALTHCHECK: unknown type {word!r}: use CMD or NONE")
    _need("HEALTHCHECK CMD", cmd)
    js = parse_json_array(cmd)
    test = ["CMD", *js] if js is not None else ["CMD-SHELL", cmd]
    kw: dict = {}
    for flag in ("interval", "timeout", "start-period", "start-interval"):
        v = flags.get(flag)
        if v:
            d = parse_duration(v[-1], f"HEALTHCHECK --{flag}")
            if d and d < 1_000_000:
                raise DockerfileError(f"HEALTHCHECK --{flag} cannot be less than 1ms")
            kw[flag.replace("-", "_")] = d
    if flags.get("retries"):
        v = flags["retries"][-1]
        if not v.isdigit() or int(v) < 1:
            raise DockerfileError(f"HEALTHCHECK --retries must be at least 1, got {v!r}")
        kw["retries"] = int(v)
    return Healthcheck(**base, test=test, **kw)


def _copy(cls):
    def parse_(base: dict, rest: str, esc: str):
        keyword = base["keyword"]
        js = parse_json_array(rest)
        words = js if js is not None else split_words(rest, esc)
        if len(words) < 2:
            raise DockerfileError(f"{keyword} requires at least two arguments, but only {len(words)} given: "
                                  f"{keyword} <src>... <dest>")
        return cls(**base, sources=words[:-1], dest=words[-1], json_form=js is not None)
    return parse_


PARSERS = {
    "FROM": _from,
    "RUN": _command(Run),
    "CMD": _command(Cmd),
    "ENTRYPOINT": _command(Entrypoint),
    "SHELL": _shell,
    "ENV": _key_values(Env),
    "LABEL": _key_values(Label),
    "MAINTAINER": _maintainer,
    "EXPOSE": _expose,
    "VOLUME": _volume,
    "USER": _one(User, "user"),
    "WORKDIR": _one(Workdir, "path"),
    "ARG": _arg,
    "STOPSIGNAL": _one(Stopsignal, "signal"),
    "HEALTHCHECK": _healthcheck,
    "ADD": _copy(Add),
    "COPY": _copy(Copy),
    "ONBUILD": None,  # handled in _instruction
}
