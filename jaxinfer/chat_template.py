"""Chat templates: compiled once per model, rendered within bounds on size and time.

A chat template is code from the model file. It runs in jinja2's
ImmutableSandboxedEnvironment with the extensions, filters and globals that
transformers gives it. The sandbox stops attribute and mutation tricks but not a
template that builds gigabytes (`{{ 'a ' * 25000000 }}`) or loops for minutes, so
`render` adds two bounds and raises ChatTemplateLimitError (an InputError) naming
the one crossed:

- size: `max_chars = OUTPUT_CHARS + 2 * (characters of the context)` (rendering
  copies the messages, so legitimate output grows with them). The output is
  counted as it streams, and every operation that can build a value larger than
  its inputs (`*`, `+`, `**`, `%`, `~`, list/tuple/dict literals, captured blocks,
  filters, methods of str) predicts its result before it allocates and refuses one
  over `max_chars`. Predictions count `str()` of containers roughly (escapes in
  reprs are ignored), so an intermediate value can reach a small multiple of the
  bound; the output bound is exact.
- time: the compiled template checks a deadline (`RENDER_SECONDS`) on entering
  every loop iteration, macro and block, and so do the hooks above. The check is
  generated into the template's code rather than made by a `sys.settrace` hook: in
  CPython 3.12 a trace function set on one thread instruments the bytecode of all
  of them (measured: a loop on another thread ran 2.6x slower, and a render 2.5x).
  C calls cannot be interrupted; the size checks keep each of them short.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import math
import re
import string
import threading
import time
from collections.abc import Iterator, Mapping

import jinja2
import jinja2.compiler
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from jaxinfer.errors import InputError

OUTPUT_CHARS = 1 << 20  # output allowed on top of twice the context's characters
RENDER_SECONDS = 2.0
MAX_INT_BITS = 1 << 16  # str() of an int stops at 4300 digits (~14k bits) anyway


class TemplateCompileError(ValueError):
    """A chat template that does not compile; str() says where and what ("line 1: ...")."""


class ChatTemplateLimitError(InputError):
    """A render that crossed the size or the time bound."""


class _Bounds(threading.local):
    """The bounds of the render running on this thread; the defaults apply outside a render
    (constant folding while compiling)."""

    max_chars = OUTPUT_CHARS
    deadline = math.inf


_bounds = _Bounds()


def compile_template(source: object) -> jinja2.Template:
    """Compile `source` in the bounded sandbox; TemplateCompileError if it does not compile."""
    if not isinstance(source, str):
        raise TemplateCompileError(f"its type is {type(source).__name__}, not str")
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateCompileError(f"line {e.lineno}: {e.message}") from e
    except Exception as e:  # the compiler itself fails on some inputs (RecursionError on deep nesting)
        raise TemplateCompileError(f"{type(e).__name__}: {e}") from e


def render(template: jinja2.Template, **context) -> str:
    """`template` rendered with `context` (messages, add_generation_prompt, ...) within the bounds.

    InputError when the template raises (raise_exception, input it trips on) or crosses a bound."""
    outer = _bounds.max_chars, _bounds.deadline  # a template cannot render another; restored anyway
    _bounds.max_chars = max_chars = OUTPUT_CHARS + 2 * _context_chars(context)
    _bounds.deadline = time.monotonic() + RENDER_SECONDS
    pieces, total, stream = [], 0, template.generate(**context)
    try:
        for piece in stream:
            total += len(piece)
            if total > max_chars:
                raise _too_large()
            pieces.append(piece)
    except InputError:
        raise
    except Exception as e:  # raise_exception() in the template, or the template tripping on input
        raise InputError(f"chat template rejected the messages: {str(e)[:2000]}") from e
    finally:
        stream.close()
        _bounds.max_chars, _bounds.deadline = outer
    return "".join(pieces)


def _context_chars(context: Mapping) -> int:
    """Characters the template is given; the messages' strings counted without a general walk."""
    total = 0
    for value in context.values():
        if type(value) is not list:
            total += _size(value, math.inf)
            continue
        for message in value:
            if type(message) is not dict:
                total += _size(message, math.inf)
                continue
            for v in message.values():
                total += len(v) if type(v) is str else _size(v, math.inf)
    return total


# ---- checks -----------------------------------------------------------------------------------

def _tick() -> None:
    if time.monotonic() > _bounds.deadline:
        raise ChatTemplateLimitError(f"the chat template took longer than {RENDER_SECONDS:g} s to render")


def _too_large(what: str | None = None) -> ChatTemplateLimitError:
    detail = f" ({what})" if what else ""
    return ChatTemplateLimitError(f"the chat template's output exceeds {_bounds.max_chars} characters{detail}")


def _check(size: int, what: str) -> None:
    if size > _bounds.max_chars:
        raise _too_large(f"{what} would make {size}")


def _checked(value, what: str):
    """`value`, refused when str() of it would exceed the bound."""
    if isinstance(value, (str, bytes, bytearray)):
        _check(len(value), what)
    elif isinstance(value, (list, tuple, set, frozenset, dict)):
        _check(_size(value), what)
    return value


def _metered(items: Iterator, what: str) -> Iterator:
    """`items`, refused once what it yielded adds up past the bound (a filter may collect it)."""
    total = 0
    for item in items:
        total += _size(item)
        if total > _bounds.max_chars:
            raise _too_large(f"{what} collecting more than that")
        _tick()
        yield item


# ---- sizes ------------------------------------------------------------------------------------

def _size(value, budget: float | None = None) -> int:
    """Characters of str(value), roughly (containers walked); stops counting once past `budget`.
    Exact types first: an ABC isinstance check costs a Python call."""
    if type(value) is str:
        return len(value)
    budget = _bounds.max_chars if budget is None else budget
    chars, stack = 0, [value]
    while stack and chars <= budget:
        v = stack.pop()
        kind = type(v)
        if kind is str:
            chars += len(v)
        elif kind is dict:
            chars += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif kind is list or kind is tuple:
            chars += 2 + 2 * len(v)
            stack.extend(v)
        elif kind is bool or kind is float or v is None:
            chars += 8
        else:
            chars += _other_size(v, stack)
    return chars


def _other_size(v, stack: list) -> int:
    if isinstance(v, (str, bytes, bytearray)):
        return len(v)
    if isinstance(v, Mapping):
        stack.extend(itertools.chain.from_iterable(v.items()))
        return 2 + 4 * len(v)
    if isinstance(v, (list, tuple, set, frozenset)):
        stack.extend(v)
        return 2 + 2 * len(v)
    if isinstance(v, jinja2.utils.Namespace):  # str() shows its attributes
        stack.append(v._Namespace__attrs)
        return 12
    if isinstance(v, int):
        return v.bit_length() // 3 + 2
    return 24


def _shape(value, budget: float) -> tuple[int, int]:
    """(values inside, nesting depth) of `value`; stops once past `budget` values."""
    nodes, depth, stack = 0, 0, [(value, 1)]
    while stack and nodes <= budget:
        v, level = stack.pop()
        nodes, depth = nodes + 1, max(depth, level)
        if isinstance(v, Mapping):
            v = list(itertools.chain.from_iterable(v.items()))
        if isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(zip(v, itertools.repeat(level + 1)))
    return nodes, depth


def _total_size(values, budget: float | None = None) -> int:
    total, budget = 0, _bounds.max_chars if budget is None else budget
    for v in values:
        total += len(v) if type(v) is str else _size(v, budget)
        if total > budget:
            break
    return total


def _int_arg(value, default: int = 0) -> int:
    return value if isinstance(value, int) else default


# Result sizes, called with the arguments of the function they guard.

def _pad_size(s, width=0, *_):  # str.center/ljust/rjust/zfill, the center filter
    return max(_size(s), _int_arg(width))


def _expandtabs_size(s, tabsize=8):
    return len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_int_arg(tabsize, 8), 0)


def _replace_size(s, old, new, count=None):
    n, o = _size(s), _size(old)
    hits = n + 1 if o == 0 else n // o
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return n + hits * _size(new)


def _join_size(sep, items, *_):
    if isinstance(items, (str, bytes, bytearray)):
        return len(items) * (1 + _size(sep))
    items = items if isinstance(items, (list, tuple)) else list(items)  # a dict joins its keys
    separators = _size(sep) * max(len(items) - 1, 0)
    return separators + _total_size(items, max(_bounds.max_chars - separators, 0))


def _translate_size(s, table):
    widest = max((_size(v) for v in table.values()), default=1) if isinstance(table, Mapping) else 1
    return len(s) * max(widest, 1)


_DIGITS = re.compile(r"\d+")
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _fields_size(fmt, fields: int, specs, values, widths_from_values: bool) -> int:
    """A format's output: its text, its widths, and each field as wide as the widest value, plus
    the largest integer value where widths come from values ('%*s', '{:>{}}')."""
    numbers = [int(n) if len(n) < 19 else 10**19 for s in specs for n in _DIGITS.findall(s)]
    values = list(values)
    widest = max((_size(v) for v in values), default=0)
    if widths_from_values:
        widest += max((abs(v) for v in values if type(v) is int), default=0)
    return len(fmt) + sum(numbers) + fields * widest


def _percent_size(fmt, args) -> int:  # `fmt % args` and the format filter
    if not isinstance(fmt, (str, bytes)):
        return 0
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    specs = [x for spec in _PERCENT_SPEC.findall(text) for x in spec]
    values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,)
    return _fields_size(text, len(specs) // 2, specs, values, "*" in specs)


def _format_size(fmt, *args, **kwargs) -> int:  # str.format
    fields, specs, pending = 0, [], [fmt]
    while pending:  # a spec can hold fields of its own: '{:>{width}}'
        for _, field, spec, _ in string.Formatter().parse(pending.pop()):
            fields += field is not None
            if spec:
                specs.append(spec)
                pending.append(spec)
    return _fields_size(fmt, fields, specs, (*args, *kwargs.values()), any("{" in spec for spec in specs))


def _format_map_size(fmt, mapping) -> int:
    return _format_size(fmt, *mapping.values()) if isinstance(mapping, Mapping) else 0


def _lines(s) -> int:
    return s.count("\n") + s.count("\r") + 1 if isinstance(s, str) else 1


def _indent_size(s, width=4, *_, **__):
    return _size(s) + _lines(s) * (max(width, 0) if isinstance(width, int) else _size(width))


def _wordwrap_size(s, width=79, break_long_words=True, wrapstring=None, *_, **__):
    n = _size(s)
    return n + (n // max(_int_arg(width, 1), 1) + _lines(s)) * (1 if wrapstring is None else _size(wrapstring))


def _batch_size(value, linecount=0, fill_with=None):  # fills the last batch up to linecount
    return _size(value) + (0 if fill_with is None else _int_arg(linecount) * _size(fill_with))


def _slice_size(value, slices=0, fill_with=None):  # makes `slices` lists, filled or not
    return _size(value) + _int_arg(slices) * (2 + (0 if fill_with is None else _size(fill_with)))


def _urlize_size(value, trim_url_limit=None, nofollow=False, target=None, rel=None, *_, **__):
    n = _size(value)
    return 3 * n + (n // 2 + 1) * (_size(target or "") + _size(rel or ""))


def _tojson_size(value, ensure_ascii=False, indent=None, *_, **__):
    chars = _size(value)
    if indent is None or chars > _bounds.max_chars:
        return chars
    nodes, depth = _shape(value, _bounds.max_chars)
    width = len(indent) if isinstance(indent, str) else _int_arg(indent)
    return chars + nodes * (width * depth + 1)  # a newline and the indent before each value


def _value_size(value, *_, **__):  # filters that turn their value into text
    return _size(value)


def _sum_size(iterable, attribute=None, start=0):
    return _size(iterable) + _size(start)


_TEXT_METHOD_SIZES = {
    "center": _pad_size, "ljust": _pad_size, "rjust": _pad_size, "zfill": _pad_size,
    "expandtabs": _expandtabs_size, "replace": _replace_size, "join": _join_size,
    "format": _format_size, "format_map": _format_map_size, "translate": _translate_size,
}
_FILTER_SIZES = {
    "center": _pad_size, "indent": _indent_size, "wordwrap": _wordwrap_size,
    "format": lambda value, *args, **kwargs: _percent_size(value, kwargs or args),
    "join": lambda value, d="", attribute=None: _join_size(d, value),
    "replace": _replace_size, "batch": _batch_size, "slice": _slice_size, "urlize": _urlize_size,
    "tojson": _tojson_size, "sum": _sum_size,
    **{name: _value_size for name in (
        "string", "pprint", "striptags", "escape", "e", "forceescape", "urlencode", "safe", "trim",
        "title", "capitalize", "upper", "lower", "wordcount", "xmlattr", "truncate", "reverse")},
}


def _call_size(obj, owner, name: str):
    """The result-size function for calling `obj` (`owner.name`), None where results are small."""
    if isinstance(owner, (str, bytes, bytearray)):
        size = _TEXT_METHOD_SIZES.get(name)
        return size and functools.partial(size, owner)
    if type(owner) is int and name == "to_bytes":
        return lambda length=1, *_, **__: _int_arg(length)
    if owner is dict and name == "fromkeys":
        return lambda keys, value=None: len(keys) * (_size(value) + 4)
    if obj is jinja2.utils.generate_lorem_ipsum:
        return lambda n=5, html=True, min=20, max=100: _int_arg(n) * _int_arg(max) * 12
    return None


def _binop_size(operator: str, left, right) -> int:
    """Size of `left <operator> right` where it can outgrow its operands, else 0."""
    seq = (str, bytes, bytearray, list, tuple)
    if operator == "*":
        if isinstance(left, int) and isinstance(right, seq):
            left, right = right, left
        if isinstance(left, seq) and isinstance(right, int):
            return _size(left) * max(right, 0)
    elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
        return _size(left) + _size(right)
    elif operator == "%" and isinstance(left, (str, bytes)):
        return _percent_size(left, right)
    return 0


def _int_bits(operator: str, left, right) -> int:
    """Bits of an integer `left <operator> right` (squaring loops, huge powers), else 0."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return 0
    if operator == "*":
        return left.bit_length() + right.bit_length()
    if operator == "**" and right > 0 and abs(left) > 1:
        return left.bit_length() * right
    return 0


# ---- the environment --------------------------------------------------------------------------

def _bounded_filter(name: str, func):
    """`func` refusing results predicted or found over the bound. functools.wraps keeps
    `jinja_pass_arg` (context or environment first)."""
    size, at = _FILTER_SIZES.get(name), 1 if hasattr(func, "jinja_pass_arg") else 0
    what = f"the {name} filter"

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        _tick()
        if len(args) > at and isinstance(args[at], Iterator):
            value = _metered(args[at], what)
            args = (*args[:at], list(value) if size else value, *args[at + 1:])  # predicting consumes it
        if size and len(args) > at:
            _check(size(*args[at:], **kwargs), what)
        return _checked(func(*args, **kwargs), what)

    return bounded


def _checked_literal(visit):
    def checked(self, node, frame):
        if getattr(node, "ctx", "load") != "load":  # `{% for a, b in ... %}` targets
            return visit(self, node, frame)
        self.write("environment.checked_literal(")
        visit(self, node, frame)
        self.write(")")
    return checked


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Adds to the compiled template what the sandbox's hooks do not see: the deadline check
    on entering loop bodies, macros and blocks; `a ~ b`; list/tuple/dict literals (nesting
    references can make one huge); the buffers of captured blocks."""

    def visit_Add(self, node, frame):
        """A chain `a + b + c ...` in one call (templates build each message that way)."""
        terms = [node.right]
        while isinstance(node.left, jinja2.nodes.Add):
            node = node.left
            terms.append(node.right)
        if len(terms) == 1:
            return super().visit_Add(node, frame)
        self.write("environment.add_chain(context, (")
        for term in (node.left, *reversed(terms)):
            self.visit(term, frame)
            self.write(", ")
        self.write("))")

    def enter_frame(self, frame):
        self.writeline("environment.tick()")
        super().enter_frame(frame)

    @jinja2.compiler.optimizeconst
    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.autoescape else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.sized_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    visit_List = _checked_literal(jinja2.compiler.CodeGenerator.visit_List)
    visit_Tuple = _checked_literal(jinja2.compiler.CodeGenerator.visit_Tuple)
    visit_Dict = _checked_literal(jinja2.compiler.CodeGenerator.visit_Dict)

    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class _OutputBuffer(list):
    """The output of a captured block (`{% set x %}`, a macro, `{% filter %}`), bounded as it fills."""

    chars = 0

    def append(self, piece):
        self.chars += len(piece)
        _check(self.chars, "a captured block")
        super().append(piece)

    def extend(self, pieces):
        pieces = list(pieces)
        self.chars += sum(map(len, pieces))
        _check(self.chars, "a captured block")
        super().extend(pieces)


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The environment transformers renders chat templates in, plus the bounds."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})
    tick = staticmethod(_tick)

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_checked_output,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    @staticmethod
    def sized_join(join, values):
        _check(_total_size(values), "~")
        return join(values)

    @staticmethod
    def checked_literal(value):
        return _checked(value, "a literal")

    @staticmethod
    def output_buffer():
        return _OutputBuffer()

    def add_chain(self, context, terms):
        chars = 0
        for term in terms:
            if type(term) is not str:
                break
            chars += len(term)
        else:
            if chars <= _bounds.max_chars:
                return "".join(terms)
        return functools.reduce(functools.partial(self.call_binop, context, "+"), terms)

    def call_binop(self, context, operator, left, right):
        if (operator == "+" and type(left) is str and type(right) is str  # the common case, fast
                and len(left) + len(right) <= _bounds.max_chars):
            return left + right
        _check(_binop_size(operator, left, right), repr(operator))
        bits = _int_bits(operator, left, right)
        if bits > MAX_INT_BITS:
            raise ChatTemplateLimitError(f"the chat template computes an integer of about {bits} bits "
                                         f"with {operator!r} (more than {MAX_INT_BITS})")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        what = f"{name}()"
        size = _call_size(target, owner, name)
        if size is not None:
            args = tuple(list(_metered(a, what)) if isinstance(a, Iterator) else a for a in args)
            own = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}  # not jinja's
            _check(size(*args, **own), what)
        return _checked(super().call(context, obj, *args, **kwargs), what)


def _checked_output(value):
    """`finalize` of every `{{ ... }}`: str() of a container is built before the stream counts it."""
    return value if type(value) is str else _checked(value, "an output")


# ---- what transformers adds to the sandbox ----------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.TemplateError(message if isinstance(message, str) else repr(_checked(message, "a message")))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


_ENV = _BoundedEnvironment()
