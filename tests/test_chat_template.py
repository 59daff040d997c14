"""Chat templates are code from the model file: rendering one is bounded in size and time
(jaxinfer.chat_template), and stays what transformers' sandbox renders below the bounds.

Each bomb below builds 100 MB or more when rendered without bounds; with them it is refused
before it allocates, which the traced peak of Python allocations shows.
"""

import json
import pathlib
import threading
import time
import tracemalloc

import jinja2.sandbox
import pytest

from jaxinfer.errors import InputError
from jaxinfer.tokenizer import CHATML_TEMPLATE, Tokenizer

SPM = json.loads((pathlib.Path(__file__).parent / "data" / "tokenizer_spm.json").read_text(encoding="utf-8"))
HI = [{"role": "user", "content": "hi"}]
MB = 1 << 20


@pytest.fixture(scope="module")
def backend():
    return Tokenizer.from_gguf_metadata(SPM["metadata"]).backend


def with_template(backend, template: str) -> Tokenizer:
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2, chat_template=template)


BOMBS = {
    "str * int": "{{ 'a ' * 50000000 }}",
    "list * int": "{{ ['ab'] * 20000000 }}",
    "% width": "{{ '%100000000s' % 'x' }}",
    "center filter": "{{ 'x'|center(100000000) }}",
    "str.center": "{{ 'x'.center(100000000) }}",
    "format spec": "{{ '{:>100000000}'.format('x') }}",
    "~ doubling": "{% set ns = namespace(s='ab') %}{% for i in range(26) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                  "{{ ns.s|length }}",
    "captured block": "{% set s = 'a' * 1000000 %}{% set x %}{% for i in range(100) %}{{ s }}{% endfor %}"
                      "{% endset %}{{ x|length }}",
    "nested literals": "{% set s = 'a' * 1000000 %}{% set a = [s, s, s, s, s, s, s, s, s, s] %}"
                       "{% set b = [a, a, a, a, a, a, a, a, a, a] %}{{ b|string|length }}",
    "list of fresh strings": "{{ (range(100)|map('center', 1000000)|list)|length }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(100000) }}",
    "replace": "{{ ('a' * 1000).replace('', 'b' * 100000) }}",
    "join separator": "{{ range(100000)|join('x' * 1000) }}",
    "tojson indent": "{{ (range(10000)|list)|tojson(indent=10000) }}",
    "dict.fromkeys": "{{ dict.fromkeys(range(100000), 'a' * 1000)|string|length }}",
    "indent": "{{ ('a\n' * 100000)|indent(1000) }}",
    "huge power": "{{ (2 ** 400000000) > 1 }}",
}


@pytest.mark.parametrize("template", BOMBS.values(), ids=BOMBS.keys())
def test_templates_that_would_build_100_mb_are_refused_before_they_allocate(backend, template):
    tok = with_template(backend, template)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(InputError, match=r"the chat template('s output exceeds \d+ characters"
                                             r"| computes an integer of about \d+ bits)"):
            tok.apply_chat_template(HI)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MB, f"{peak / MB:.0f} MB allocated"
    assert elapsed < 1.5  # refused by the size checks, not stopped by the deadline


def test_output_over_the_bound_is_refused_while_it_streams(backend):
    tok = with_template(backend, "{% for i in range(60000) %}{{ 'x' * 40 }}{% endfor %}")  # 2.4 MB
    with pytest.raises(InputError, match=r"output exceeds 1048\d+ characters"):
        tok.apply_chat_template(HI)


def test_the_size_bound_grows_with_the_messages(backend):
    """Output is allowed 1 MiB plus twice the input: a template may repeat each message once."""
    tok = with_template(backend, "{% for m in messages %}{{ m.content }}|{{ m.content }}{% endfor %}")
    content = "long message " * 300_000  # 3.9 MB
    assert tok.apply_chat_template([{"role": "user", "content": content}]) == f"{content}|{content}"


LOOPS = {
    "nested loops without output": "{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}",
    "exponential macro recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                                   "{{ f(21) }}",
    "loop over a list": "{% set l = range(3000)|list %}{% for i in range(100000) %}{% for x in l %}{% endfor %}"
                        "{% endfor %}",
}


@pytest.mark.parametrize("template", LOOPS.values(), ids=LOOPS.keys())
def test_a_template_that_runs_long_stops_at_the_deadline(backend, template):
    tok = with_template(backend, template)
    start = time.perf_counter()
    with pytest.raises(InputError, match="the chat template took longer than 2 s to render"):
        tok.apply_chat_template(HI)
    assert time.perf_counter() - start < 3.5


def test_deadlines_hold_per_thread_while_other_threads_render(backend):
    looping = with_template(backend, LOOPS["nested loops without output"])
    errors = []

    def render_looping():
        try:
            looping.apply_chat_template(HI)
        except InputError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=render_looping) for _ in range(2)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    normal = with_template(backend, CHATML_TEMPLATE)
    while any(t.is_alive() for t in threads):  # renders on this thread are unaffected meanwhile
        assert normal.apply_chat_template(HI) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        time.sleep(0.05)
    assert errors == ["the chat template took longer than 2 s to render"] * 2
    assert time.perf_counter() - start < 6


# Small uses of every guarded operation, rendered by transformers' sandbox as the reference.
EVERYDAY = (
    "{{ 'ab' * 3 }}|{{ 3 * [1] }}|{{ [1] + [2] + [3] }}|{{ 'a' + 'b' + 'c' }}|{{ 1 + 2 + 3.5 }}|{{ 2 ** 10 }}"
    "|{{ '%05.1f|%s|%*d' % (3.14159, 'x', 4, 7) }}|{{ '%(a)s' % {'a': 1} }}|{{ 'a' ~ 1 ~ none }}"
    "|{{ '{:>4}{}'.format(7, 'z') }}|{{ '{a}'.format_map({'a': 5}) }}|{{ 'x'|center(5) }}|{{ 'x'.ljust(3, '.') }}"
    "|{{ 'a\tb'.expandtabs(4) }}|{{ 'aXbX'.replace('X', '--') }}|{{ '-'.join(['a', 'b']) }}"
    "|{{ [1, 2]|join(',') }}|{{ messages|map(attribute='role')|join('/') }}|{{ 'a\nb'|indent(2) }}"
    "|{{ messages|tojson }}|{{ {'k': [1, 2]}|tojson(indent=2) }}|{{ range(5)|batch(2, 0)|list }}"
    "|{{ [[1], [2]]|sum(start=[]) }}|{{ '%s'|format(4) }}|{{ (1, 2) }}|{{ {'a': 1} }}"
    "{% set x %}{% for m in messages %}[{{ m.content }}]{% endfor %}{% endset %}|{{ x }}"
    "{% macro tag(v) %}<{{ v }}>{% endmacro %}|{{ tag('q') }}{% filter upper %}|abc{% endfilter %}"
    "{% for a, b in [(1, 2)] %}|{{ a }}{{ b }}{% endfor %}"
    "|{{ '%d' % 1700000000 }}|{{ '{}'.format(1700000000) }}|{{ (5).to_bytes(2, 'big')|length }}"
    "|{{ messages|selectattr('role', 'equalto', 'user')|list|length }}{{ 1700000000|default(0) }}"
)


def test_guarded_operations_render_as_transformers_sandbox_renders_them(backend):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    reference = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    reference.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    expected = reference.from_string(EVERYDAY).render(messages=messages, add_generation_prompt=True)
    assert with_template(backend, EVERYDAY).apply_chat_template(messages) == expected
