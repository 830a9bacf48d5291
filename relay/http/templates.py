"""Templates for the injection APIs: SparkPost's template language and Jinja.

A request's templated fields (subject, bodies, headers, a whole RFC 5322 message) are
compiled ONCE per request with ``compile_field`` into a ``Field``; ``Field.render(ctx)``
then runs once per recipient. A field without any template syntax is a constant and is
never rendered. Compiled templates are also kept in a small LRU cache keyed by
(dialect, mode, source), because bulk senders send the same template in request after
request; a cached template is immutable and shared safely.

Both dialects run on ``jinja2.sandbox.SandboxedEnvironment`` (no attribute escapes such
as ``{{ ''.__class__ }}``, ``range`` capped), with two extra guards: ``*`` and ``**`` may
not build huge strings, lists or numbers. The sandbox does not bound CPU time: callers
are authenticated API clients.

Errors: a syntax error is a ``PayloadError`` (422 ``template_error``) naming the field
and the line (and column for SparkPost syntax); an error while rendering for one
recipient is a ``RenderError`` (the API layer turns it into a per-recipient failure).

Dialects
--------
``jinja`` (KumoMTA's default, which is minijinja): Jinja2 syntax; HTML autoescape only
in ``html`` mode; undefined variables render empty (minijinja's default "lenient"
behaviour; attribute access on an undefined value is an error, as in minijinja);
``none``/``true``/``false`` render as minijinja does. Not available: minijinja-contrib's
extra filters and functions (``datetimeformat``, ``now``, ``pluralize``, ...); using one
is a syntax error naming the field. HTML escaping is markupsafe's (``&#39;``, ``&#34;``,
``/`` left alone, where minijinja writes ``&#x27;``, ``&quot;``, ``&#x2f;``; browsers
show the same text).

``static``: no templating at all (KumoMTA's ``Static``, SparkPost's
``perform_substitutions: false``).

``sparkpost``: SparkPost's handlebars-style language, translated to Jinja source by
``translate_sparkpost`` (the translation is small and exact; nothing of the user's text
can become Jinja syntax: the Jinja delimiters are prefixed with NUL, which templates may
not contain, and every expression is re-emitted from parsed tokens). Supported:

- ``{{ expr }}`` (HTML-escaped in ``html`` mode with SparkPost's escapes, including
  ``/`` -> ``&#x2F;``; URL-encoded when it stands inside a link, i.e. after ``http://``
  or ``https://`` with no whitespace, quote or angle bracket in between, in ``text``
  and ``html`` modes) and ``{{{ expr }}}`` (raw);
- expressions: variables, nested paths ``a.b``, ``a['b']``, ``a[part]``, 1-based array
  indexes ``a[1]``, string and number literals, ``true``/``false``/``nil``,
  ``== != ~= < > <= >=``, ``and or not`` (Lua semantics: only ``nil`` and ``false``
  are false, ``a or b`` yields ``a`` or ``b``), ``+ - * /``, the length operator
  ``#a``, parentheses; the macros ``empty(x)`` and the six brace macros
  (``opening_double_curly()`` ...);
- ``{{if cond [then]}}...{{elseif cond}}...{{else}}...{{end}}``;
- ``{{each array}}...{{end}}`` with ``loop_var``, ``loop_index`` (counted from 1, like
  array indexes) and ``loop_vars.<array name>`` for nested loops;
- ``{{!comment}}``;
- a statement (and a comment) swallows the spaces and the one line break after it, so
  that statements on their own line leave no blank line.

Values render like SparkPost's Lua: missing and ``null`` as empty, ``true``/``false``,
whole floats without ``.0`` (``%.14g``); objects and arrays as JSON.
Not supported (422 naming the field): ``render_dynamic_content()``,
``render_snippet()`` and any other macro.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from typing import Any

import msgspec
from jinja2 import TemplateSyntaxError, Undefined, pass_context
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import missing

from relay.http.payload import PayloadError

__all__ = [
    "HTML",
    "JINJA",
    "SPARKPOST",
    "STATIC",
    "TEXT",
    "Field",
    "RenderError",
    "compile_field",
    "translate_sparkpost",
]

SPARKPOST, JINJA, STATIC = "sparkpost", "jinja", "static"
#: Modes: body text, HTML body (escaping), header value (no escaping, no link encoding).
TEXT, HTML, HEADER = "text", "html", "header"

#: The largest string/list that ``*`` may build, and the largest exponent of ``**``.
MAX_PRODUCT_LEN = 1_000_000
MAX_EXPONENT = 1024
#: Sources longer than this are compiled but not kept in the cache.
CACHEABLE_SOURCE = 256 * 1024


class RenderError(Exception):
    """Rendering ``field`` failed for one recipient; ``message`` says why (and where)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class _TranslateError(Exception):
    def __init__(self, message: str, pos: int) -> None:
        super().__init__(message)
        self.message = message
        self.pos = pos


# --- sandboxes ----------------------------------------------------------------------


def _too_big(operator: str, left: Any, right: Any) -> bool:
    if operator == "**":
        return isinstance(right, int | float) and abs(right) > MAX_EXPONENT and left not in (
            0, 1, -1)
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            return len(seq) * n > MAX_PRODUCT_LEN
    return False


class _Sandbox(SandboxedEnvironment):
    """The Jinja sandbox plus size guards on ``*`` and ``**``."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if _too_big(operator, left, right):
            raise SecurityError(f"the result of {operator!r} would be too large")
        return super().call_binop(context, operator, left, right)


_MISSING = object()


class _SparkPostSandbox(_Sandbox):
    """Item lookups only (JSON objects and arrays), never Python attributes; a lookup on
    a missing or non-container value is undefined (renders empty), as in SparkPost."""

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(obj) is dict:
            value = obj.get(argument, _MISSING)
            if value is not _MISSING:
                return value
        elif type(obj) is list and type(argument) is int and 0 <= argument < len(obj):
            return obj[argument]
        return self.undefined(obj=obj, name=argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, LoopContext):
            return super().getattr(obj, attribute)
        return self.undefined(obj=obj, name=attribute)


def _kumo_finalize(value: Any) -> Any:
    """minijinja's rendering of ``none``, ``true`` and ``false``."""
    if value is None:
        return "none"
    if value is True:
        return "true"
    if value is False:
        return "false"
    return value


def _jinja_env(autoescape: bool) -> _Sandbox:
    return _Sandbox(autoescape=autoescape, keep_trailing_newline=True,
                    finalize=_kumo_finalize, auto_reload=False)


# --- SparkPost runtime helpers ------------------------------------------------------


def sp_str(value: Any) -> str:
    """A value as SparkPost's Lua renders it."""
    if type(value) is str:
        return value
    if value is None or isinstance(value, Undefined):
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is float:
        return f"{value:.14g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)


_HTML_SPECIALS = re.compile(r"[&<>\"'/]")


def sp_html(value: Any) -> str:
    """SparkPost's HTML escaping (``& < > " ' /``)."""
    text = sp_str(value)
    if not _HTML_SPECIALS.search(text):
        return text
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;").replace("/", "&#x2F;"))


def sp_url(value: Any) -> str:
    """A value inside a link: percent-encoded (SparkPost's "personalized links")."""
    return urllib.parse.quote(sp_str(value), safe="")


def sp_true(value: Any) -> bool:
    """Lua truth: only nil (missing) and false are false."""
    return value is not None and value is not False and not isinstance(value, Undefined)


def sp_or(left: Any, right: Any) -> Any:
    return left if sp_true(left) else right


def sp_and(left: Any, right: Any) -> Any:
    return right if sp_true(left) else left


def sp_len(value: Any) -> int:
    return len(value) if isinstance(value, list | dict | str) else 0


def sp_empty(value: Any) -> bool:
    return sp_len(value) == 0


def sp_iter(value: Any) -> list[Any]:
    return value if type(value) is list else []


def sp_index(obj: Any, key: Any) -> Any:
    """``obj[key]`` with Lua's 1-based array indexes."""
    if type(obj) is list:
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if type(key) is int and 1 <= key <= len(obj):
            return obj[key - 1]
    elif type(obj) is dict and type(key) is str and key in obj:
        return obj[key]
    return Undefined(obj=obj, name=str(key))


@pass_context
def sp_var(context: Context, name: str) -> Any:
    """A variable whose name is special to Jinja (``in``, ``loop``, ``range``, ...)."""
    value = context.resolve_or_missing(name)
    if value is missing or value is _SPARKPOST_ENV.globals.get(name, missing):
        return Undefined(name=name)  # never one of the helpers below
    return value


def sp_loopvars(outer: Any, name: str, value: Any) -> dict[str, Any]:
    """``loop_vars`` inside a loop over ``name``: the enclosing loops' plus this one."""
    out = dict(outer) if type(outer) is dict else {}
    out[name] = value
    return out


_SPARKPOST_ENV = _SparkPostSandbox(
    autoescape=False, keep_trailing_newline=True, auto_reload=False,
    block_start_string="\x00{%", block_end_string="%}",
    variable_start_string="\x00{{", variable_end_string="}}",
    comment_start_string="\x00{#", comment_end_string="#}")
_SPARKPOST_ENV.filters.update(_sp_text=sp_str, _sp_html=sp_html, _sp_url=sp_url)
_SPARKPOST_ENV.globals.clear()  # no range(), dict(), lipsum(), ...: only the helpers
_SPARKPOST_ENV.globals.update(
    _sp_t=sp_true, _sp_or=sp_or, _sp_and=sp_and, _sp_len=sp_len, _sp_empty=sp_empty,
    _sp_iter=sp_iter, _sp_index=sp_index, _sp_loopvars=sp_loopvars, _sp_var=sp_var)
_JINJA_ENVS = {False: _jinja_env(False), True: _jinja_env(True)}


# --- SparkPost -> Jinja translation --------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|~=|!=|<=|>=|[<>+\-*/\#()\[\].,])
""", re.X | re.S)
_KEYWORDS = frozenset({"and", "or", "not", "true", "false", "nil"})
_COMPARISONS = frozenset({"==", "!=", "~=", "<", ">", "<=", ">="})
#: Names that mean something to Jinja: a SparkPost variable by that name is looked up
#: in the template context by ``sp_var`` instead.
_JINJA_NAMES = frozenset({
    "in", "is", "if", "else", "elif", "none", "None", "True", "False", "loop", "self",
    "super", "varargs", "kwargs", "caller", "range", "dict", "lipsum", "cycler", "joiner",
    "namespace", "recursive", "with", "without", "context", "ignore", "missing", "import",
    "from", "as", "for", "set", "block", "macro", "call", "filter", "raw", "include"})
_BRACES = {
    "opening_single_curly": "{", "closing_single_curly": "}",
    "opening_double_curly": "{{", "closing_double_curly": "}}",
    "opening_triple_curly": "{{{", "closing_triple_curly": "}}}",
}
_UNSUPPORTED_MACROS = frozenset({"render_dynamic_content", "render_snippet"})
_LUA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f",
                "v": "\v", "\\": "\\", '"': '"', "'": "'", "\n": "\n"}
_LUA_ESCAPE = re.compile(r"\\(\d{1,3}|.)", re.S)


def _lua_string(literal: str) -> str:
    """The value of a quoted Lua string literal."""
    def unescape(m: re.Match[str]) -> str:
        code = m.group(1)
        if code.isdigit():
            return chr(int(code))
        return _LUA_ESCAPES.get(code, code)
    return _LUA_ESCAPE.sub(unescape, literal[1:-1])


class _Expr:
    """A recursive-descent parser for one SparkPost expression; ``parse()`` returns the
    equivalent Jinja expression. ``last_name`` is the last name seen (what an ``each``
    loop calls its array in ``loop_vars``)."""

    def __init__(self, text: str, offset: int) -> None:
        self.offset = offset
        self.tokens = self._tokenize(text)
        self.i = 0
        self.last_name = ""

    def _tokenize(self, text: str) -> list[tuple[str, str, int]]:
        tokens, pos = [], 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise _TranslateError(f"unexpected character {text[pos]!r}", self.offset + pos)
            kind = m.lastgroup or ""
            if kind != "ws":
                value = m.group()
                if kind == "name" and value in _KEYWORDS:
                    kind = "op"
                tokens.append((kind, value, self.offset + pos))
            pos = m.end()
        return tokens

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _accept(self, *values: str) -> str | None:
        tok = self._peek()
        if tok is not None and tok[0] == "op" and tok[1] in values:
            self.i += 1
            return tok[1]
        return None

    def _error(self, message: str) -> _TranslateError:
        tok = self._peek()
        pos = tok[2] if tok else self.offset + sum(len(t[1]) for t in self.tokens)
        return _TranslateError(message, pos)

    def _expect(self, value: str) -> None:
        if self._accept(value) is None:
            raise self._error(f"expected {value!r}")

    def parse(self) -> str:
        if not self.tokens:
            raise self._error("empty expression")
        out = self._or()
        if self._peek() is not None:
            raise self._error(f"unexpected {self._peek()[1]!r}")  # type: ignore[index]
        return out

    def _or(self) -> str:
        left = self._and()
        while self._accept("or"):
            left = f"_sp_or({left}, {self._and()})"
        return left

    def _and(self) -> str:
        left = self._comparison()
        while self._accept("and"):
            left = f"_sp_and({left}, {self._comparison()})"
        return left

    def _comparison(self) -> str:
        left = self._sum()
        while (op := self._accept(*_COMPARISONS)) is not None:
            op = "!=" if op == "~=" else op
            left = f"({left} {op} {self._sum()})"
        return left

    def _sum(self) -> str:
        left = self._product()
        while (op := self._accept("+", "-")) is not None:
            left = f"({left} {op} {self._product()})"
        return left

    def _product(self) -> str:
        left = self._unary()
        while (op := self._accept("*", "/")) is not None:
            left = f"({left} {op} {self._unary()})"
        return left

    def _unary(self) -> str:
        if self._accept("not"):
            return f"(not _sp_t({self._unary()}))"
        if self._accept("-"):
            return f"(-{self._unary()})"
        if self._accept("#"):
            return f"_sp_len({self._unary()})"
        return self._postfix()

    def _postfix(self) -> str:
        out = self._primary()
        while True:
            if self._accept("."):
                tok = self._peek()
                if tok is None or tok[0] != "name":
                    raise self._error("expected a name after '.'")
                self.i += 1
                self.last_name = tok[1]
                out = f"{out}[{tok[1]!r}]"
            elif self._accept("["):
                tok = self._peek()
                index = self._or()
                self._expect("]")
                if tok is not None and tok[0] == "num" and index.isdigit():
                    out = f"{out}[{int(index) - 1}]"
                else:
                    out = f"_sp_index({out}, {index})"
            else:
                return out

    def _primary(self) -> str:
        tok = self._peek()
        if tok is None:
            raise self._error("expression ends too early")
        kind, value, _ = tok
        self.i += 1
        if kind == "num":
            return value
        if kind == "str":
            return repr(_lua_string(value))
        if kind == "op":
            if value == "(":
                inner = self._or()
                self._expect(")")
                return f"({inner})"
            constants = {"true": "true", "false": "false", "nil": "none"}
            if value in constants:
                return constants[value]
            self.i -= 1
            raise self._error(f"unexpected {value!r}")
        if self._accept("("):
            return self._call(value)
        self.last_name = value
        if value in _JINJA_NAMES or value.startswith("_sp_"):
            return f"_sp_var({value!r})"
        return value

    def _call(self, name: str) -> str:
        args = []
        if not self._accept(")"):
            args.append(self._or())
            while self._accept(","):
                args.append(self._or())
            self._expect(")")
        if name in _BRACES and not args:
            return repr(_BRACES[name])
        if name == "empty" and len(args) == 1:
            return f"_sp_empty({args[0]})"
        if name in _UNSUPPORTED_MACROS:
            raise _TranslateError(f"{name}() is not supported", self.offset)
        raise _TranslateError(f"unknown macro {name}()", self.offset)


_STATEMENT = re.compile(r"\s*(if|elseif|else|end|each)(?![A-Za-z0-9_])")
_THEN = re.compile(r"\s+then\s*$")
_TRAILING_WS = re.compile(r"[ \t]*(?:\r\n|\n|\r)?")
_LINK_TAIL = re.compile(r"[\s\"'<>]([^\s\"'<>]*)\Z")


class _Translator:
    """SparkPost source -> Jinja source (see the module docstring). Line numbers are
    kept: every line break of the source appears in the output at the same line."""

    def __init__(self, source: str, mode: str) -> None:
        self.src = source
        self.mode = mode
        self.out: list[str] = []
        self.blocks: list[tuple[str, int]] = []  # ("if" | "each", position)
        self.run = ""  # the text since the last whitespace/quote/bracket: inside a link?

    def translate(self) -> str:
        src, pos = self.src, 0
        if "\x00" in src:
            raise _TranslateError("NUL characters are not allowed", src.index("\x00"))
        while (start := src.find("{{", pos)) >= 0:
            self._literal(src[pos:start])
            pos = self._tag(start)
        self._literal(src[pos:])
        if self.blocks:
            kind, where = self.blocks[-1]
            raise _TranslateError(f"{{{{{kind}}}}} is never closed with {{{{end}}}}", where)
        return "".join(self.out)

    def _literal(self, text: str) -> None:
        if not text:
            return
        self.out.append(text)
        tail = _LINK_TAIL.search(text)
        self.run = tail.group(1) if tail else self.run + text

    def _close(self, start: int, close: str) -> int:
        """The position of ``close`` ending the tag opened at ``start`` (quotes honoured)."""
        src, i, quote = self.src, start, ""
        while i < len(src):
            c = src[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif src.startswith(close, i):
                return i
            i += 1
        opener = "{{{" if close == "}}}" else "{{"
        raise _TranslateError(f"{opener} is never closed with {close}", start - len(opener))

    def _tag(self, start: int) -> int:
        raw = self.src.startswith("{{{", start)
        close = "}}}" if raw else "}}"
        inner_start = start + len(close)
        end = self._close(inner_start, close)
        inner = self.src[inner_start:end]
        pos = end + len(close)
        breaks = "\n" * inner.count("\n")
        if not raw and inner.lstrip().startswith("!"):
            pos, more = self._swallow(pos)
            self.out.append(f"\x00{{#{breaks}{more}#}}")
            return pos
        m = None if raw else _STATEMENT.match(inner)
        if m is not None:
            pos, more = self._swallow(pos)
            jinja = self._statement(m.group(1), inner[m.end():], inner_start + m.end(), start)
            self.out.append(f"\x00{{% {jinja} {breaks}{more}%}}")
            return pos
        expr = _Expr(inner, inner_start).parse()
        self.out.append(f"\x00{{{{ ({expr})|{self._filter(raw)} {breaks}}}}}")
        self.run += "x"
        return pos

    def _swallow(self, pos: int) -> tuple[int, str]:
        """Skip the spaces and one line break after a statement; return the new position
        and the line breaks skipped (re-emitted inside the Jinja tag)."""
        m = _TRAILING_WS.match(self.src, pos)
        assert m is not None
        return m.end(), "\n" * (m.group().count("\n") or m.group().count("\r"))

    def _filter(self, raw: bool) -> str:
        run = self.run.lower()
        if self.mode != HEADER and ("http://" in run or "https://" in run):
            return "_sp_text" if raw else "_sp_url"
        if raw or self.mode != HTML:
            return "_sp_text"
        return "_sp_html"

    def _statement(self, keyword: str, rest: str, offset: int, start: int) -> str:
        if keyword in ("if", "elseif"):
            rest = _THEN.sub("", rest)
            cond = _Expr(rest, offset).parse()
            if keyword == "if":
                self.blocks.append(("if", start))
                return f"if _sp_t({cond})"
            self._expect_open("if", "elseif", start)
            return f"elif _sp_t({cond})"
        if keyword == "each":
            parser = _Expr(rest, offset)
            array = parser.parse()
            name = parser.last_name or "loop"
            self.blocks.append(("each", start))
            return (f"for loop_var in _sp_iter({array}) %}}\x00{{% set loop_index = loop.index"
                    f" %}}\x00{{% set loop_vars = _sp_loopvars(loop_vars, {name!r}, loop_var)")
        if rest.strip():
            raise _TranslateError(f"unexpected text after {{{{{keyword}}}}}", offset)
        if keyword == "else":
            self._expect_open("if", "else", start)
            return "else"
        if not self.blocks:
            raise _TranslateError("{{end}} without {{if}} or {{each}}", start)
        kind, _ = self.blocks.pop()
        return "endif" if kind == "if" else "endfor"

    def _expect_open(self, kind: str, keyword: str, start: int) -> None:
        if not self.blocks or self.blocks[-1][0] != kind:
            raise _TranslateError(f"{{{{{keyword}}}}} without {{{{{kind}}}}}", start)


def translate_sparkpost(source: str, mode: str) -> str:
    """SparkPost template source -> Jinja source for ``_SPARKPOST_ENV``. Raises
    ``ValueError`` with ``.args = (message, position)`` on a syntax error."""
    try:
        return _Translator(source, mode).translate()
    except _TranslateError as e:
        raise ValueError(e.message, e.pos) from None
    except RecursionError:
        raise ValueError("an expression is nested too deeply", 0) from None


# --- compiling and rendering ---------------------------------------------------------


def _line_col(source: str, pos: int) -> tuple[int, int]:
    line = source.count("\n", 0, pos) + 1
    return line, pos - (source.rfind("\n", 0, pos) + 1) + 1


def _syntax_error(field: str, text: str) -> PayloadError:
    return PayloadError(422, "template_error", "Invalid template",
                        f"{field}: template syntax error: {text}", field)


def _has_syntax(source: str, dialect: str) -> bool:
    if dialect == STATIC:
        return False
    if dialect == SPARKPOST:
        return "{{" in source
    return "{{" in source or "{%" in source or "{#" in source


@functools.lru_cache(maxsize=256)
def _compile_cached(source: str, dialect: str, mode: str) -> Any:
    return _compile(source, dialect, mode)


def _compile(source: str, dialect: str, mode: str) -> Any:
    """A Jinja Template for ``source``; raises ValueError(message, line, column|None)."""
    if dialect == SPARKPOST:
        try:
            jinja_source = translate_sparkpost(source, mode)
        except ValueError as e:
            message, pos = e.args
            raise ValueError(message, *_line_col(source, pos)) from None
        env: _Sandbox = _SPARKPOST_ENV
    else:
        jinja_source, env = source, _JINJA_ENVS[mode == HTML]
    try:
        template = env.from_string(jinja_source)
    except TemplateSyntaxError as e:
        raise ValueError(e.message or "syntax error", e.lineno, None) from None
    except RecursionError:
        raise ValueError("the template is nested too deeply", 1, None) from None
    # The template's globals as a plain dict: every render copies them, and copying a
    # ChainMap costs more than the rest of a small render.
    template.globals = dict(template.globals)
    return template


def _error_line(error: BaseException) -> int | None:
    """The template line an exception was raised at (Jinja rewrites tracebacks)."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class Field:
    """One compiled template field. ``constant`` is its value when it has no template
    syntax (then ``render`` just returns it)."""

    __slots__ = ("_template", "constant", "field")

    def __init__(self, field: str, constant: str | None, template: Any) -> None:
        self.field = field
        self.constant = constant
        self._template = template

    def render(self, ctx: dict[str, Any]) -> str:
        """The field rendered for one recipient's ``ctx``; raises ``RenderError``."""
        if self.constant is not None:
            return self.constant
        try:
            return self._template.render(ctx)
        except Exception as e:  # whatever user data makes a template raise
            line = _error_line(e)
            where = f"line {line}: " if line is not None else ""
            raise RenderError(self.field, f"{where}{type(e).__name__}: {e}") from None


def compile_field(source: str, field: str, *, dialect: str, mode: str) -> Field:
    """Compile ``source`` (the value of JSON field ``field``) once for a request.

    ``dialect`` is ``SPARKPOST``, ``JINJA`` or ``STATIC``; ``mode`` is ``TEXT``,
    ``HTML`` or ``HEADER``. A syntax error raises ``PayloadError`` 422
    ``template_error`` naming the field, the line and (SparkPost) the column.
    """
    if not _has_syntax(source, dialect):
        return Field(field, source, None)
    compile_ = _compile_cached if len(source) <= CACHEABLE_SOURCE else _compile
    try:
        template = compile_(source, dialect, mode)
    except ValueError as e:
        message, line, column = e.args
        where = f"line {line}" + (f", column {column}" if column is not None else "")
        raise _syntax_error(field, f"{where}: {message}") from None
    return Field(field, None, template)
