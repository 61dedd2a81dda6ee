"""The Dockerfile language: parser, substitution, .dockerignore and the context.

Expected results come from the BuildKit Dockerfile reference (and, where
buildah 1.28 can serve, tests/test_build_oracle.py checks the same against it).
"""

from __future__ import annotations

import os

import pytest

from layerdb.engine.build import dockerfile as df
from layerdb.engine.build.context import Context
from layerdb.engine.build.ignore import Ignore
from layerdb.engine.build.shell import expand_word, expand_words, split_words
from layerdb.engine.errors import ContextError, DockerfileError


def one(text: str) -> df.Instruction:
    d = df.parse("FROM scratch\n" + text)
    assert len(d.stages[0].instructions) == 1, d.stages[0].instructions
    return d.stages[0].instructions[0]


# Syntax --------------------------------------------------------------------------


def test_instructions_in_any_case_and_original_text_kept():
    d = df.parse("from scratch AS Build\nrUn echo hi\nEnv a=b\n")
    assert [i.keyword for i in d.instructions] == ["FROM", "RUN", "ENV"]
    assert d.stages[0].name == "build"
    assert [i.original for i in d.instructions] == ["from scratch AS Build", "rUn echo hi", "Env a=b"]
    assert [i.line for i in d.instructions] == [1, 2, 3]


def test_continuations_comments_inside_and_blank_lines():
    text = (
        "FROM scratch\n"
        "RUN echo a \\\n"
        "  # a comment inside the continuation\n"
        "\n"
        "    && echo b \\\n"
        "#another\n"
        "  && echo c\n"
        "ENV X=1\n"
    )
    d = df.parse(text)
    run, env = d.stages[0].instructions
    assert run.command == "echo a     && echo b   && echo c"
    assert (run.line, run.end_line) == (2, 7)
    assert env.line == 8


def test_continuation_with_trailing_whitespace_and_at_eof():
    d = df.parse("FROM scratch\nRUN a \\  \t\n b\nRUN c \\")
    assert [i.command for i in d.stages[0].instructions] == ["a  b", "c"]


def test_hash_not_at_line_start_is_no_comment():
    assert one("RUN echo # not a comment").command == "echo # not a comment"
    assert one("   # indented comment\nRUN x").command == "x"


def test_crlf_and_bom():
    d = df.parse("\ufeffFROM scratch\r\nRUN a \\\r\n b\r\n")
    assert d.stages[0].instructions[0].command == "a  b"


def test_directives_only_at_the_top():
    d = df.parse("# syntax=docker/dockerfile:1.7\n# ESCAPE=`\nFROM scratch\nRUN a `\n b\n")
    assert d.directives == {"syntax": "docker/dockerfile:1.7", "escape": "`"}
    assert d.escape == "`"
    assert d.stages[0].instructions[0].command == "a  b"
    # After a comment, an empty line or an unknown directive, directives are comments.
    for text in ("# hello\n# escape=`\nFROM scratch\n", "\n# escape=`\nFROM scratch\n",
                 "# unknown=1\n# escape=`\nFROM scratch\n", "FROM scratch\n# escape=`\n"):
        assert df.parse(text).escape == "\\", text
    with pytest.raises(DockerfileError, match=r"Dockerfile:2: only one escape parser directive"):
        df.parse("# escape=`\n# escape=\\\nFROM scratch\n")
    with pytest.raises(DockerfileError, match="invalid escape token"):
        df.parse("# escape=x\nFROM scratch\n")


def test_backtick_escape_keeps_backslashes_literal():
    d = df.parse("# escape=`\nFROM scratch\nCOPY testfile.txt c:\\\nRUN dir c:\\\n")
    copy, run = d.stages[0].instructions
    assert copy.dest == "c:\\"
    assert run.command == "dir c:\\"


def test_shell_and_exec_forms():
    assert one('RUN ["/bin/echo", "a b"]').command == ["/bin/echo", "a b"]
    assert one("RUN [ -f /x ] && echo y").command == "[ -f /x ] && echo y"  # not JSON: shell form
    assert one('CMD ["a", 1]').command == '["a", 1]'  # not all strings: shell form
    assert one('ENTRYPOINT ["/e"]').exec_form
    assert not one("CMD run me").exec_form
    assert one('SHELL ["/bin/bash", "-c"]').shell == ["/bin/bash", "-c"]
    with pytest.raises(DockerfileError, match="SHELL requires the arguments to be in JSON form"):
        one("SHELL /bin/bash -c")


def test_every_instruction_parses_into_its_type():
    text = """\
ARG BASE=scratch
FROM --platform=linux/amd64 ${BASE} AS one
RUN --mount=type=cache,target=/c --network=none echo hi
CMD ["a"]
LABEL a=b "c d"="e f" g=h\\ i
MAINTAINER Someone <a@b>
EXPOSE 80 53/udp
ENV A=1 B="x y"
ENV C legacy value here
ADD --chown=1:2 --chmod=640 a.tar /opt/
COPY --from=0 --link /x /y
ENTRYPOINT ["/e"]
VOLUME ["/data", "/v"]
VOLUME /a /b
USER app:app
WORKDIR /srv/$A
ARG X Y=2
ONBUILD RUN echo child
STOPSIGNAL SIGKILL
HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=2s --retries=3 CMD curl -f http://x/
SHELL ["/bin/sh", "-ec"]
"""
    d = df.parse(text)
    kinds = [type(i).__name__ for i in d.instructions]
    assert kinds == ["Arg", "From", "Run", "Cmd", "Label", "Maintainer", "Expose", "Env", "Env", "Add", "Copy",
                     "Entrypoint", "Volume", "Volume", "User", "Workdir", "Arg", "Onbuild", "Stopsignal",
                     "Healthcheck", "Shell"]
    i = {n: d.instructions[k] for k, n in enumerate(kinds)}
    frm = d.instructions[1]
    assert (frm.image, frm.stage_name, frm.platform) == ("${BASE}", "one", "linux/amd64")
    assert d.global_args[0].names == [("BASE", "scratch")]
    run = d.instructions[2]
    assert run.mounts == ["type=cache,target=/c"] and run.network == "none" and run.command == "echo hi"
    assert d.instructions[4].pairs == [("a", "b"), ('"c d"', '"e f"'), ("g", "h\\ i")]
    assert d.instructions[5].name == "Someone <a@b>"
    assert d.instructions[6].ports == ["80", "53/udp"]
    assert d.instructions[7].pairs == [("A", "1"), ("B", '"x y"')]
    env2 = d.instructions[8]
    assert env2.legacy and env2.pairs == [("C", "legacy value here")]
    add = d.instructions[9]
    assert (add.sources, add.dest, add.chown, add.chmod) == (["a.tar"], "/opt/", "1:2", "640")
    copy = d.instructions[10]
    assert (copy.from_, copy.link, copy.sources, copy.dest) == ("0", True, ["/x"], "/y")
    assert d.instructions[12].paths == ["/data", "/v"] and d.instructions[12].json_form
    assert d.instructions[13].paths == ["/a", "/b"]
    assert d.instructions[14].user == "app:app"
    assert d.instructions[15].path == "/srv/$A"
    assert d.instructions[16].names == [("X", None), ("Y", "2")]
    ob = d.instructions[17]
    assert ob.trigger_text == "RUN echo child" and isinstance(ob.trigger, df.Run)
    assert d.instructions[18].signal == "SIGKILL"
    hc = i["Healthcheck"]
    assert hc.test == ["CMD-SHELL", "curl -f http://x/"]
    assert (hc.interval, hc.timeout, hc.start_period, hc.retries) == (90 * 10**9, 500 * 10**6, 2 * 10**9, 3)
    assert i["Shell"].shell == ["/bin/sh", "-ec"]


def test_healthcheck_forms():
    assert one("HEALTHCHECK NONE").test == ["NONE"]
    assert one('HEALTHCHECK CMD ["/bin/true"]').test == ["CMD", "/bin/true"]
    with pytest.raises(DockerfileError, match="not a duration"):
        one("HEALTHCHECK --interval=5 CMD true")
    with pytest.raises(DockerfileError, match="retries must be at least 1"):
        one("HEALTHCHECK --retries=0 CMD true")
    with pytest.raises(DockerfileError, match="unknown type"):
        one("HEALTHCHECK RUN true")


def test_copy_json_form_and_flag_forms():
    c = one('COPY ["a b", "c", "/d/"]')
    assert (c.sources, c.dest, c.json_form) == (["a b", "c"], "/d/", True)
    c = one("COPY --chown=\"1000:1000\" --link=false -- a b")
    assert (c.chown, c.link, c.sources, c.dest) == ("1000:1000", False, ["a"], "b")
    c = one("COPY --exclude=*.tmp --exclude=*.log . /app")
    assert c.excludes == ["*.tmp", "*.log"]


@pytest.mark.parametrize("text, message", [
    ("ECHO hi", "Dockerfile:2: unknown instruction: ECHO"),
    ("COPY onlyone", "Dockerfile:2: COPY requires at least two arguments"),
    ("RUN", "Dockerfile:2: RUN requires at least one argument"),
    ("COPY --bogus=1 a b", "Dockerfile:2: COPY: unknown flag: --bogus"),
    ("ENV --x=1 a=b", "Dockerfile:2: ENV: unknown flag: --x"),
    ("COPY --from a b", "Dockerfile:2: COPY: missing a value on flag: --from"),
    ("COPY --from=a --from=b c d", "duplicate flag specified: --from"),
    ("ENV a=b c", "Dockerfile:2: ENV: can't find = in 'c'"),
    ("ENV onlykey", "ENV must have two arguments"),
    ("ONBUILD FROM x", "FROM isn't allowed as an ONBUILD trigger"),
    ("ONBUILD ONBUILD RUN x", "ONBUILD isn't allowed as an ONBUILD trigger"),
    ("ARG 1x=2", "ARG: invalid name '1x'"),
    ("FROM a b", "FROM requires either one argument, or three"),
    ("FROM a AS 1st", "invalid name for build stage"),
    ("RUN <<EOT\necho\n", "unterminated heredoc 'EOT'"),
])
def test_bad_lines_name_file_and_line(text, message):
    with pytest.raises(DockerfileError) as e:
        df.parse("FROM scratch\n" + text, "Dockerfile")
    assert message in e.value.message
    assert e.value.message.startswith("Dockerfile:")


def test_structure_errors():
    with pytest.raises(DockerfileError, match="Dockerfile:1: ENV before the first FROM"):
        df.parse("ENV a=b\nFROM scratch\n")
    with pytest.raises(DockerfileError, match="no FROM instruction"):
        df.parse("ARG x=1\n")
    with pytest.raises(DockerfileError, match="holds no instructions"):
        df.parse("# only a comment\n\n")
    with pytest.raises(DockerfileError, match="Dockerfile:2: duplicate stage name 'a'"):
        df.parse("FROM scratch AS a\nFROM scratch AS A\n")


def test_stages_by_name_and_index():
    d = df.parse("ARG V=1\nFROM scratch AS base\nRUN a\nFROM base\nRUN b\nFROM scratch AS Last\n")
    assert [s.name for s in d.stages] == ["base", None, "last"]
    assert d.stage("BASE") is d.stages[0] and d.stage("1") is d.stages[1] and d.stage("last") is d.stages[2]
    assert d.stage("3") is None and d.stage("nope") is None
    assert [len(s.instructions) for s in d.stages] == [1, 1, 0]
    assert [a.names for a in d.global_args] == [[("V", "1")]]


# Heredocs ------------------------------------------------------------------------


def test_heredocs():
    d = df.parse(
        "FROM scratch\n"
        "RUN <<EOT\n"
        "echo $HOME\n"
        "  indented\n"
        "EOT\n"
        "RUN <<-'EOF' cat > /x\n"
        "\t\tleading tabs go\n"
        "\tEOF\n"
        'COPY <<A <<"B" /dir/\n'
        "a body\n"
        "A\n"
        "b $body\n"
        "B\n"
        "RUN python3 <<PY\n"
        "print(1)\n"
        "PY\n"
        "ENV after=1\n"
    )
    run, run2, copy, run3, env = d.stages[0].instructions
    assert [(h.name, h.content, h.expand) for h in run.heredocs] == [("EOT", "echo $HOME\n  indented\n", True)]
    assert run.command == "<<EOT"
    assert [(h.name, h.content, h.expand) for h in run2.heredocs] == [("EOF", "leading tabs go\n", False)]
    assert [(h.name, h.content, h.expand) for h in copy.heredocs] == [("A", "a body\n", True),
                                                                        ("B", "b $body\n", False)]
    assert copy.sources == ["<<A", '<<"B"'] and copy.dest == "/dir/"
    assert copy.heredoc('<<"B"').content == "b $body\n" and copy.heredoc("file") is None
    assert run3.command == "python3 <<PY" and run3.heredocs[0].content == "print(1)\n"
    assert (env.line, run3.end_line) == (17, 16)


def test_heredoc_markers_only_where_allowed():
    # CMD takes no here-document: `<<EOT` stays in its text and the next line is an instruction.
    assert one("CMD cat <<EOT").command == "cat <<EOT"
    with pytest.raises(DockerfileError, match="Dockerfile:3: unknown instruction: EOT"):
        df.parse("FROM scratch\nCMD cat <<EOT\nEOT\n")
    assert one("RUN echo a<<b").heredocs == []  # a word that does not start with << is no marker


# Substitution ----------------------------------------------------------------------

ENV = {"v": "val", "empty": "", "sp": "a  b", "path": "/usr/local/bin.tar.gz"}


@pytest.mark.parametrize("word, out", [
    ("$v", "val"), ("${v}", "val"), ("x${v}y", "xvaly"), ("$v.x", "val.x"), ("$unset", ""), ("${unset}", ""),
    ("${v:-w}", "val"), ("${empty:-w}", "w"), ("${unset:-w}", "w"), ("${empty-w}", ""), ("${unset-w}", "w"),
    ("${v:+w}", "w"), ("${empty:+w}", ""), ("${unset:+w}", ""), ("${empty+w}", "w"), ("${unset+w}", ""),
    ("${unset:-$v}", "val"), ("${unset:-${v:+nested}}", "nested"), ("${unset:-a b}", "a b"),
    ("\\$v", "$v"), ("\\${v}", "${v}"), ("'$v'", "$v"), ('"$v"', "val"), ('"\\$v"', "$v"), ('"a\\b"', "a\\b"),
    ('"q\\"q"', 'q"q'), ("a\\ b", "a b"), ("$", "$"), ("a$", "a$"), ("$1x", "x"), ("$-x", "$-x"),
    ("${path#*/}", "usr/local/bin.tar.gz"), ("${path##*/}", "bin.tar.gz"), ("${path%.*}", "/usr/local/bin.tar"),
    ("${path%%.*}", "/usr/local/bin"), ("${v:?must}", "val"),
    ("it's", "its") if False else ("'it'\"'\"'s'", "it's"),
])
def test_expand_word(word, out):
    assert expand_word(word, ENV) == out


def test_expand_word_keeps_whitespace_and_errors():
    assert expand_word("  $sp  ", ENV) == "  a  b  "
    with pytest.raises(DockerfileError, match="missing '}'"):
        expand_word("${v", ENV)
    with pytest.raises(DockerfileError, match="unset: must be set"):
        expand_word("${unset:?must be set}", ENV)
    with pytest.raises(DockerfileError, match="missing '"):
        expand_word("'open", ENV)
    with pytest.raises(DockerfileError, match="bad substitution"):
        expand_word("${}", ENV)


def test_expand_words_splits_unquoted_values():
    assert expand_words("$sp c", ENV) == ["a", "b", "c"]
    assert expand_words('"$sp" c', ENV) == ["a  b", "c"]
    assert expand_words("'' x", ENV) == ["", "x"]
    assert expand_words("$empty x", ENV) == ["x"]


def test_backtick_escape_in_substitution():
    assert expand_word("`$v", ENV, escape="`") == "$v"
    assert expand_word("c:\\$v", ENV, escape="`") == "c:\\val"


def test_split_words_keeps_quotes():
    assert split_words('a "b c" d\\ e \'f g\'') == ['a', '"b c"', "d\\ e", "'f g'"]


# .dockerignore ------------------------------------------------------------------------


@pytest.mark.parametrize("patterns, path, ignored", [
    (["ignored"], "ignored", True), (["ignored"], "ignored/deep/file", True), (["ignored"], "x/ignored", False),
    (["/abs/"], "abs/x", True), (["a//b/../c"], "a/c", True),
    (["*.tmp"], "x.tmp", True), (["*.tmp"], "d/x.tmp", False), (["**/*.tmp"], "d/e/x.tmp", True),
    (["**/*.tmp"], "x.tmp", True), (["**"], "anything/at/all", True), (["a/**/z"], "a/z", True),
    (["a/**/z"], "a/b/c/z", True), (["a/**/z"], "b/z", False),
    (["d?"], "dd", True), (["d?"], "d/x", False), (["x[ab]y"], "xay", True), (["x[ab]y"], "xcy", False),
    (["x[^ab]y"], "xcy", True), (["x[^ab]y"], "xay", False), (["a\\*b"], "a*b", True), (["a\\*b"], "axb", False),
    (["**/*.tmp", "!app/keep.tmp"], "app/keep.tmp", False), (["**/*.tmp", "!app/keep.tmp"], "app/x.tmp", True),
    (["dir", "!dir/keep"], "dir/keep", False), (["dir", "!dir/keep"], "dir/other", True),
    (["!a", "a"], "a", True), (["a", "!a"], "a", False),  # the last match wins
    (["*", "!*.py", "secret.py"], "main.py", False), (["*", "!*.py", "secret.py"], "secret.py", True),
    (["# comment", "", "  spaced  "], "spaced", True), (["# comment"], "# comment", False),
])
def test_dockerignore(patterns, path, ignored):
    assert Ignore(patterns).ignored(path) is ignored


def test_dockerignore_files_for_build(tmp_path):
    (tmp_path / ".dockerignore").write_text("a\n")
    (tmp_path / "Dockerfile.dockerignore").write_text("b\n")
    assert Ignore.for_build(str(tmp_path), str(tmp_path / "Dockerfile")).ignored("b")
    assert not Ignore.for_build(str(tmp_path), str(tmp_path / "Dockerfile")).ignored("a")
    assert Ignore.for_build(str(tmp_path), str(tmp_path / "Other")).ignored("a")
    assert not Ignore.for_build(str(tmp_path / "nope") if False else str(tmp_path), None).ignored("b")


# Context -----------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path):
    root = tmp_path / "ctx"
    (root / "app" / "sub").mkdir(parents=True)
    (root / "app" / "a.py").write_text("a")
    (root / "app" / "b.tmp").write_text("b")
    (root / "app" / "sub" / "c.py").write_text("c")
    (root / "top.txt").write_text("t")
    (tmp_path / "secret").write_text("s")
    os.symlink("../secret", root / "out")
    os.symlink("/etc/passwd", root / "abs")
    os.symlink("app/a.py", root / "in")
    os.symlink("../../../secret", root / "app" / "sub" / "deep")
    return root


def test_context_sources_and_walk(ctx):
    c = Context(str(ctx), Ignore(["**/*.tmp"]))
    assert [s.rel for s in c.sources("app/*.py")] == ["app/a.py"]
    assert [s.rel for s in c.sources("./app/../top.txt")] == ["top.txt"]
    assert [s.rel for s in c.sources("in")] == ["app/a.py"]  # a symlink inside the context is followed
    app = c.sources("app")[0]
    assert [m.rel for m in c.walk(app)] == ["", "a.py", "sub", "sub/c.py", "sub/deep"]  # b.tmp ignored
    with pytest.raises(ContextError, match="no such file"):
        c.sources("app/b.tmp")
    with pytest.raises(ContextError, match="no such file"):
        c.sources("nothing*")


@pytest.mark.parametrize("source", ["../secret", "app/../../secret", "out", "abs", "app/sub/deep"])
def test_context_refuses_sources_outside(ctx, source):
    with pytest.raises(ContextError, match="outside the build context"):
        Context(str(ctx)).sources(source)


def test_context_walk_reincludes_below_ignored_dir(ctx):
    c = Context(str(ctx), Ignore(["app", "!app/sub/c.py"]))
    root = c.sources(".")[0]
    assert [m.rel for m in c.walk(root)] == ["", "abs", "in", "out", "top.txt", "app/sub/c.py"]


def test_run_mount_specs_as_the_reference_defines_them():
    from layerdb.engine.build.mounts import parse as mount

    m = mount("type=bind,source=src,target=out", "/work")
    assert (m.type, m.source, m.target, m.readonly) == ("bind", "src", "/work/out", True)  # below WORKDIR
    assert mount("target=/x,rw", "/").readonly is False and mount("dst=/x,readwrite=true", "/").readonly is False
    c = mount("type=cache,target=/root/.cache,sharing=locked,uid=7,mode=0700", "/")
    assert (c.readonly, c.id, c.sharing, c.uid, c.mode) == (False, "/root/.cache", "locked", 7, 0o700)
    s = mount("type=secret,id=tok", "/")
    assert (s.target, s.mode, s.required, s.readonly) == ("/run/secrets/tok", 0o400, False, True)
    assert mount("type=secret,target=/etc/key,required", "/").id == "key"
    assert mount("type=tmpfs,target=/t,size=64m", "/").size == 64 << 20
    assert mount('type=bind,"source=a,b",target=/x', "/").source == "a,b"  # CSV quoting
    for bad, message in (("type=cache,target=/x,source=/s", "give from= too"),
                         ("type=tmpfs,target=/t,size=lots", "not a size"),
                         ("type=bind,target=/", "cannot be /"), ("type=tmpfs,target=/t,ro", "takes no ro"),
                         ("target=/x,ro,rw", "exclude each other"), ("type=cache,target=/x,mode=999", "not a number")):
        with pytest.raises(DockerfileError, match=message):
            mount(bad, "/")
