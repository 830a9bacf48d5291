"""The template dialects: SparkPost's language (translated to Jinja) and Jinja itself."""

from __future__ import annotations

from typing import Any

import pytest

from relay.http import templates
from relay.http.payload import PayloadError
from relay.http.templates import HEADER, HTML, JINJA, SPARKPOST, STATIC, TEXT, RenderError


def sp(source: str, data: dict[str, Any] | None = None, mode: str = TEXT) -> str:
    field = templates.compile_field(source, "content.x", dialect=SPARKPOST, mode=mode)
    return field.render(data or {})


def sp_error(source: str, mode: str = TEXT) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        templates.compile_field(source, "content.html", dialect=SPARKPOST, mode=mode)
    assert (info.value.status, info.value.code, info.value.field) == (
        422, "template_error", "content.html")
    return info.value


# The REPL examples of developers.sparkpost.com/api/template-language (source, data, result).
DOC_EXAMPLES = [
    ("{{ value }}\n{{value}}\n{{  value   }}", {"value": "Hello 👋"},
     "Hello 👋\nHello 👋\nHello 👋"),
    ("* {{name}}\n* {{age}}\n* {{job}}\n* {{location}}",
     {"name": "Jane", "age": None, "job": "Software Engineer"},
     "* Jane\n* \n* Software Engineer\n* "),
    ("Hello {{ name or 'Customer' }}", {"name": None}, "Hello Customer"),
    ("Street: {{address.street}}\nCity: {{address['city']}}\nDynamic: {{address[part]}}",
     {"address": {"street": "Howard Street", "city": "San Francisco"}, "part": "street"},
     "Street: Howard Street\nCity: San Francisco\nDynamic: Howard Street"),
    ('Start of template\n{{ if state == "MD" }}\nMaryland\n{{ end }}\nEnd of template',
     {"state": "MD"}, "Start of template\nMaryland\nEnd of template"),
    ('{{ if state == "Baltimore" }}\nBaltimore\n{{ end }}\nMaryland', {"state": "Baltimore"},
     "Baltimore\nMaryland"),
    ("Number of states: {{#states}}", {"states": ["MD", "CA"]}, "Number of states: 2"),
    ("Your discounted price is ${{price - 5}}.", {"price": 15},
     "Your discounted price is $10."),
    ("{{ each children }}\nYou have a child named {{loop_var}}\n{{ end }}",
     {"children": ["Rusty", "Audrey"]},
     "You have a child named Rusty\nYou have a child named Audrey\n"),
    ("Your shopping cart has items in it:\n{{each shopping_cart}}\nItem: {{loop_var.name}}, "
     "Price: {{loop_var.price}}\n{{end}}",
     {"shopping_cart": [{"name": "Jacket", "price": 39.99}, {"name": "Gloves", "price": 5.00}]},
     "Your shopping cart has items in it:\nItem: Jacket, Price: 39.99\n"
     "Item: Gloves, Price: 5\n"),
    ("---\n{{each shopping_cart}}\nItem: {{loop_vars.shopping_cart.name}}\n"
     "Price: {{loop_vars.shopping_cart.price}}\nThis item has the following nested values:\n"
     "{{each loop_vars.shopping_cart.a_nested_array}}\n"
     "  Nested value: {{loop_vars.a_nested_array.key}}\n{{end}}\n---\n{{end}}",
     {"shopping_cart": [{"name": "Jacket", "price": 39.99,
                         "a_nested_array": [{"key": "v2"}, {"key": "v1"}]},
                        {"name": "Gloves", "price": 5.00}]},
     "---\nItem: Jacket\nPrice: 39.99\nThis item has the following nested values:\n"
     "  Nested value: v2\n  Nested value: v1\n---\nItem: Gloves\nPrice: 5\n"
     "This item has the following nested values:\n---\n"),
    ("You have children named {{ children[1] }} and {{ children[2] }}.",
     {"children": ["Ann", "Bob"]}, "You have children named Ann and Bob."),
    ("The first item in your shopping cart is {{ shopping_cart[1].name }}.",
     {"shopping_cart": [{"name": "Jacket"}]}, "The first item in your shopping cart is Jacket."),
    ("Here is a curly: {{ opening_double_curly() }}", {}, "Here is a curly: {{"),
]


@pytest.mark.parametrize(("source", "data", "result"), DOC_EXAMPLES)
def test_the_documented_examples(source: str, data: dict[str, Any], result: str) -> None:
    assert sp(source, data) == result


def test_html_escaping_and_triple_braces() -> None:
    source = "Escaped: {{custom_html}}\nUnescaped: {{{custom_html}}}"
    data = {"custom_html": "<b>Hello, World</b>"}
    assert sp(source, data, HTML) == ("Escaped: &lt;b&gt;Hello, World&lt;&#x2F;b&gt;\n"
                                      "Unescaped: <b>Hello, World</b>")
    assert sp(source, data, TEXT) == ("Escaped: <b>Hello, World</b>\n"
                                      "Unescaped: <b>Hello, World</b>")
    assert sp("{{v}}", {"v": "&\"'"}, HTML) == "&amp;&quot;&#x27;"


def test_expressions_in_links_are_url_encoded() -> None:
    data = {"user": "john", "offercode": "Daily Deal!", "link": "www.company.com/groups"}
    html = ('<a href="https://company.com/dailydeals?user={{user}}&offercode={{offercode}}">'
            'Go!</a> <a href="https://{{{link}}}">click me</a> {{offercode}}')
    assert sp(html, data, HTML) == (
        '<a href="https://company.com/dailydeals?user=john&offercode=Daily%20Deal%21">Go!</a>'
        ' <a href="https://www.company.com/groups">click me</a> Daily Deal!')
    assert sp("See http://x.test/?q={{offercode}} now {{offercode}}", data) == (
        "See http://x.test/?q=Daily%20Deal%21 now Daily Deal!")
    assert sp("http://x.test/?q={{offercode}}", data, HEADER) == "http://x.test/?q=Daily Deal!"


def test_conditions_have_lua_truth() -> None:
    source = "{{if v}}yes{{else}}no{{end}}"
    assert [sp(source, {"v": v}) for v in (0, "", [], False, None)] == [
        "yes", "yes", "yes", "no", "no"]
    assert sp(source) == "no"
    assert sp("{{if signed_up then}}Welcome{{end}}", {"signed_up": True}) == "Welcome"
    chain = ("{{if signed_up}}\nWelcome\n{{elseif rejected_sign_up}}\nWe won't bug you\n"
             "{{else}}\nPlease sign up\n{{end}}")
    assert sp(chain, {"rejected_sign_up": True}) == "We won't bug you\n"
    assert sp(chain) == "Please sign up\n"
    assert sp("{{if age > 30 and address.state == \"MD\"}}A{{end}}",
              {"age": 31, "address": {"state": "MD"}}) == "A"
    assert sp("{{if not signed_up}}sign up{{end}}|{{ a ~= b }}", {"a": 1, "b": 2}) == (
        "sign up|true")
    assert sp("{{ x and 'y' }}|{{ nil or false }}|{{ 0 or 1 }}") == "|false|0"


def test_loops_indexes_and_empty() -> None:
    source = "{{each items}}{{loop_index}}:{{loop_var}} {{end}}"
    assert sp(source, {"items": ["a", "b"]}) == "1:a 2:b "
    assert sp(source, {"items": None}) == sp(source) == sp(source, {"items": {"k": 1}}) == ""
    assert sp("{{ if not empty(cart) }}full{{ else }}empty{{ end }}", {"cart": []}) == "empty"
    assert sp("{{ items[0] }}{{ items[3] }}{{ items[k] }}", {"items": [1, 2], "k": 2}) == "2"


def test_values_render_like_lua() -> None:
    data = {"f": 5.0, "g": 39.99, "t": True, "o": {"a": [1]}, "big": 10 ** 20}
    assert sp("{{f}} {{g}} {{t}} {{o}} {{big}} {{ 7 / 2 }}", data) == (
        '5 39.99 true {"a":[1]} 100000000000000000000 3.5')


def test_comments_and_statements_swallow_their_line_break() -> None:
    assert sp("a\n{{! a comment }}\nb") == "a\nb"
    assert sp("{{ if x }}  \nX{{ end }}", {"x": 1}) == "X"


def test_literal_jinja_syntax_is_not_executed() -> None:
    source = "{% for x in range(3) %}X{% endfor %} {# c #} {{ '{%' }} %}"
    assert sp(source) == "{% for x in range(3) %}X{% endfor %} {# c #} {% %}"
    assert sp("{{ '}}' }}") == "}}"


def test_names_special_to_jinja_are_plain_variables() -> None:
    data = {"in": "IN", "loop": "LOOP", "range": "RANGE", "_sp_t": "T"}
    assert sp("{{in}} {{loop}} {{range}} {{_sp_t}} {{dict}} {{lipsum}} {{_sp_or}}", data) == (
        "IN LOOP RANGE T   ")


def test_no_python_attributes_are_reachable() -> None:
    assert sp("[{{ x.__class__ }}][{{ x.upper }}][{{ d.items }}]",
              {"x": "s", "d": {"a": 1}}) == "[][][]"


@pytest.mark.parametrize(("source", "where", "what"), [
    ("{{ if x }}", "line 1, column 1", "never closed"),
    ("a\n{{end}}", "line 2, column 1", "without"),
    ("{{ else }}", "line 1, column 1", "without"),
    ("{{ a + }}", "line 1", "ends too early"),
    ("x\n  {{ a $ b }}", "line 2, column 8", "unexpected character"),
    ("{{ render_dynamic_content(dynamic_html.chunk) }}", "line 1", "not supported"),
    ("{{ render_snippet('footer') }}", "line 1", "not supported"),
    ("{{ frobnicate(x) }}", "line 1", "unknown macro"),
    ("{{ x", "line 1, column 1", "never closed"),
    ("{{ }}", "line 1", "empty expression"),
    ("{{ each }}", "line 1", "empty expression"),
    ("{{ end now }}", "line 1", "unexpected text"),
    ("{{x}} nul \x00", "line 1", "NUL"),
])
def test_syntax_errors_name_the_position(source: str, where: str, what: str) -> None:
    err = sp_error(source)
    assert where in err.description and what in err.description


def test_render_errors_name_the_field_and_line() -> None:
    field = templates.compile_field("ok\n{{ a < 3 }}", "content.text", dialect=SPARKPOST,
                                    mode=TEXT)
    assert field.render({"a": 1}) == "ok\ntrue"
    with pytest.raises(RenderError) as info:
        field.render({})
    assert info.value.field == "content.text"
    assert info.value.message.startswith("line 2: ")


def test_constants_are_not_compiled_and_templates_are_cached() -> None:
    constant = templates.compile_field("no syntax {% here", "f", dialect=SPARKPOST, mode=TEXT)
    assert constant.constant == "no syntax {% here"
    assert templates.compile_field("{{ x }}", "f", dialect=STATIC, mode=TEXT).constant == (
        "{{ x }}")
    source = "cached {{ x }} " + "pad " * 10
    first = templates.compile_field(source, "a", dialect=SPARKPOST, mode=TEXT)
    second = templates.compile_field(source, "b", dialect=SPARKPOST, mode=TEXT)
    assert first._template is second._template
    other_mode = templates.compile_field(source, "c", dialect=SPARKPOST, mode=HTML)
    assert other_mode._template is not first._template


def test_jinja_dialect_escapes_only_html_and_has_minijinja_values() -> None:
    html = templates.compile_field("{{ v }}|{{ n }}|{{ t }}", "h", dialect=JINJA, mode=HTML)
    text = templates.compile_field("{{ v }}|{{ n }}|{{ t }}", "t", dialect=JINJA, mode=TEXT)
    data = {"v": "<i>", "n": None, "t": False}
    assert html.render(data) == "&lt;i&gt;|none|false"
    assert text.render(data) == "<i>|none|false"


def test_jinja_dialect_errors() -> None:
    with pytest.raises(PayloadError) as info:
        templates.compile_field("a\n{% for %}", "content.text_body", dialect=JINJA, mode=TEXT)
    assert "line 2" in info.value.description and info.value.field == "content.text_body"
    field = templates.compile_field("{{ 1 / z }}", "content.text_body", dialect=JINJA, mode=TEXT)
    with pytest.raises(RenderError) as render:
        field.render({"z": 0})
    assert "ZeroDivisionError" in render.value.message


def test_deeply_nested_expressions_are_a_syntax_error() -> None:
    err = sp_error("{{ " + "(" * 5000 + "x" + ")" * 5000 + " }}")
    assert "nested too deeply" in err.description
