"""Tool calling, the parts without a server: chats with tools rendered as transformers renders them
(on tokenizers transformers saved), tool calls read out of answers whole and in any pieces, and
request bodies with tools read as vLLM reads them. tests/test_openai_tools.py serves them."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.models.chat_template import ChatTemplate, ChatTemplateError
from splitserve.models.tokenizer import Tokenizer
from splitserve.protos import serving_pb2
from splitserve.runtime import openai_api, tool_parsers
from splitserve.runtime.client_types import build_request
from splitserve.runtime.openai_tools import ToolAnswer
from splitserve.runtime.proto_convert import chat_from_proto
from test_chat_template import _saved_tokenizer as saved_tokenizer

transformers = pytest.importorskip("transformers")

# In the style of Qwen2.5's template on the Hub: tools as JSON lines in the system turn, calls as
# <tool_call> JSON, results as <tool_response> in a user turn.
HERMES = (
    "{%- if tools %}\n"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are helpful.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# In the style of Mistral's: tools listed before the last user turn, calls and results by their ids.
BY_ID = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'user' %}{% if loop.last and tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' and m.tool_calls %}[CALLS]{% for c in m.tool_calls %}"
    "{{ {'id': c.id, 'name': c.function.name, 'arguments': c.function.arguments} | tojson }}{% endfor %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[RESULT {{ m.tool_call_id }}]{{ m.content }}[/RESULT]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city, «en français» if asked.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time."}}  # no parameters
TOOLS = [WEATHER, CLOCK]

# As OpenAI's clients send a conversation: arguments as JSON text, content null beside calls.
CALLED = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "C"}'}},
        {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, rain"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C, sun"},
    {"role": "tool", "tool_call_id": "call_3", "content": "12:00"},
    {"role": "assistant", "content": "Paris: rain. Rome: sun. Noon."},
    {"role": "user", "content": "Thanks!"},
]


def as_transformers_documents(messages):
    """The same conversation in the form transformers documents: arguments as objects."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or ():
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


@pytest.mark.parametrize("template", [HERMES, BY_ID], ids=["hermes", "by_id"])
@pytest.mark.parametrize("turns", [2, 6, len(CALLED)])
def test_chats_with_tools_render_as_transformers_renders_them(tmp_path, template, turns):
    tok = saved_tokenizer(tmp_path, template)
    ours = ChatTemplate.maybe_load(tmp_path)
    messages = CALLED[:turns]
    want = tok.apply_chat_template(as_transformers_documents(messages), tools=TOOLS, add_generation_prompt=True,
                                   tokenize=False)
    assert ours.render(messages, tools=TOOLS) == want
    assert "get_weather" in want and ("call_2" in want or template is HERMES or turns < 3)
    # Through the public proto, as the SDK sends a chat and the router reads it.
    request = build_request(None, None, messages=messages, tools=TOOLS, max_tokens=1, temperature=0.0, top_p=1.0,
                            top_k=0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False, request_id="r")
    wire = serving_pb2.GenerateRequest.FromString(request.SerializeToString())
    got_messages, got_tools = chat_from_proto(wire.messages)
    assert ours.render(got_messages, tools=got_tools) == want
    ids = Tokenizer.from_file(tmp_path / "tokenizer.json").encode(want, add_special_tokens=False)
    out = tok.apply_chat_template(as_transformers_documents(messages), tools=TOOLS, add_generation_prompt=True)
    assert ids == list(out["input_ids"] if hasattr(out, "keys") else out)


def test_no_tools_render_as_none_and_a_tool_use_template_serves_chats_with_tools(tmp_path):
    tok = saved_tokenizer(tmp_path, HERMES)
    messages = CALLED[:2]
    without = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours = ChatTemplate.maybe_load(tmp_path)
    assert ours.render(messages) == ours.render(messages, tools=[]) == without and "<tools>" not in without
    # Named templates, as transformers 5 saves them (additional_chat_templates/tool_use.jinja) and as
    # older checkpoints list them in tokenizer_config.json.
    named = tmp_path / "named"
    tok.chat_template = {"default": "plain:{{ messages[-1].content }}", "tool_use": HERMES}
    tok.save_pretrained(named)
    assert (named / "additional_chat_templates" / "tool_use.jinja").exists()
    tok = transformers.AutoTokenizer.from_pretrained(named)
    listed = tmp_path / "listed"
    listed.mkdir()
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain:{{ messages[-1].content }}"},
                               {"name": "tool_use", "template": HERMES}]
    (listed / "tokenizer_config.json").write_text(json.dumps(config))
    for directory in (named, listed):
        ours = ChatTemplate.maybe_load(directory)
        assert ours.render(messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                tokenize=False) == "plain:" + messages[-1]["content"]
        assert ours.render(messages, tools=TOOLS) == tok.apply_chat_template(
            messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("bad, message", [
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}],
     r"messages\[0\].tool_calls: only an assistant message calls tools"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     r"messages\[0\].tool_calls\[0\].function.arguments is not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     r"arguments must be a JSON object"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     r"tool_calls\[0\].function must be an object with a non-empty string name"),
    ([{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}],
     r"tool_calls\[0\].type must be \"function\""),
    ([{"role": "tool", "tool_call_id": 7, "content": "x"}], r"messages\[0\].tool_call_id must be a string"),
])
def test_malformed_tool_messages_are_named(bad, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate("{{ messages }}").render(bad)


@pytest.mark.parametrize("tools, message", [
    ([{"type": "retrieval"}], r"tools\[0\] must be an object with type \"function\""),
    ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\].function must be an object with"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}], r"parameters must be a JSON Schema"),
    ([WEATHER, WEATHER], "get_weather named more than once"),
    ({"type": "function"}, "tools must be a list"),
])
def test_malformed_tools_are_named(tools, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate("{{ tools }}").render([{"role": "user", "content": "x"}], tools=tools)


# -- reading calls out of answers -------------------------------------------------------------------
def hermes_call(name: str, arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


HERMES_ANSWERS = [  # (answer, content, [(name, arguments object)])
    ("Let me check.\n" + hermes_call("get_weather", {"city": "Paris"}) + "\n" + hermes_call("now", {}),
     "Let me check.\n", [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("No tools needed: <tool_ is only text <tool_call", "No tools needed: <tool_ is only text <tool_call", []),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>', "", [("f", {"a": [1, 2]})]),
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),  # not a call: content
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ('Cut off: <tool_call>{"name": "f", "argu', 'Cut off: <tool_call>{"name": "f", "argu', []),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),  # ended at the call (a stop string)
    ('<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',  # not JSON, though Python's json reads it
     '<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>', []),
    (hermes_call("f", {"x": "é"}) + " trailing words are dropped", "", [("f", {"x": "é"})]),
]
LLAMA_ANSWERS = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"k": 1}}', "",
     [("a", {}), ("b", {"k": 1})]),
    ("  \n The weather is {fine}.", "  \n The weather is {fine}.", []),
    ('{"name": "a", "parameters": {}} and then words', '{"name": "a", "parameters": {}} and then words', []),
    ('{"name": "a", "param', '{"name": "a", "param', []),  # cut off
    ("Plain text.", "Plain text.", []),
]

MISTRAL_ANSWERS = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]', "",
     [("get_weather", {"city": "Paris"}), ("now", {})]),
    ('Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]now[ARGS]{}', "Checking. ",
     [("get_weather", {"city": "Rome"}), ("now", {})]),
    ("Plain [TOOL_ text [TOOL", "Plain [TOOL_ text [TOOL", []),
    ('[TOOL_CALLS] [{"name": "f", "argu', '[TOOL_CALLS] [{"name": "f", "argu', []),  # cut off
    ('[TOOL_CALLS]f{"a": 1}', "", [("f", {"a": 1})]),  # no [ARGS] in the text: the name ends at "{", as vLLM
    ("[TOOL_CALLS][TOOL_CALLS]f[ARGS]{}", "", [("f", {})]),  # an empty segment is no call
    ("[TOOL_CALLS]f[CALL_ID]abcdefghi[ARGS]{}", "", [("f", {})]),  # the model's own id is not the name
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]\n\nThen words.', "", [("f", {"a": 1})]),  # as vLLM
    ('[TOOL_CALLS] {"name": "f", "arguments": {}}', "", [("f", {})]),  # one object, not a list
    ("[TOOL_CALLS] just words", "[TOOL_CALLS] just words", []),
]
ANSWERS = ([("hermes", *a) for a in HERMES_ANSWERS] + [("llama3_json", *a) for a in LLAMA_ANSWERS]
           + [("mistral", *a) for a in MISTRAL_ANSWERS])


@pytest.mark.parametrize("parser, answer, content, calls", ANSWERS)
def test_calls_are_read_out_of_whole_answers(parser, answer, content, calls):
    got_content, got_calls = tool_parsers.parse(tool_parsers.PARSERS[parser](), answer)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(calls)
    if parser == "mistral":  # its templates want 9 letters or digits when the calls come back
        assert all(len(c.id) == 9 and c.id.isalnum() for c in got_calls)


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(ANSWERS), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_an_answer_read_in_any_pieces_reads_as_the_whole(case, cuts):
    parser_name, answer, content, calls = case
    parser = tool_parsers.PARSERS[parser_name]()
    bounds = sorted({0, len(answer), *(c % (len(answer) + 1) for c in cuts)})
    deltas = [parser.feed(answer[a:b]) for a, b in zip(bounds, bounds[1:])] + [parser.finish()]
    assert "".join(d.content for d in deltas) == content
    assert [(c.name, json.loads(c.arguments)) for d in deltas for c in d.calls] == calls


# -- request bodies -----------------------------------------------------------------------------------
def chat_body(**fields):
    return {"messages": [{"role": "user", "content": "Weather?"}], **fields}


def test_tool_choice_forces_the_answer_to_the_arguments_or_to_a_list_of_calls():
    import jsonschema

    named = openai_api.parse_body(openai_api.CHAT, chat_body(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert json.loads(named.params.structured_outputs.json) == WEATHER["function"]["parameters"]
    answer = ToolAnswer(named.tool_use, None)
    content, calls = answer.whole('{"city": "Oslo"}')
    assert content is None and [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert answer.finish_reason("stop") == "stop"  # a named function: "stop", as OpenAI answers it

    required = openai_api.parse_body(openai_api.CHAT, chat_body(tools=TOOLS, tool_choice="required"))
    schema = json.loads(required.params.structured_outputs.json)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]] == [["get_weather"], ["now"]]
    jsonschema.validate([{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "x"}}],
                        schema)
    for wrong in ([], [{"name": "sleep", "parameters": {}}], [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    for forced in (named, required):
        forced.params.structured_outputs.check()  # compiles in llguidance, as the workers compile it
    answer = ToolAnswer(required.tool_use, None)
    content, calls = answer.whole('[{"name": "now", "parameters": {}}, {"name": "get_weather", '
                                  '"parameters": {"city": "Oslo"}}]')
    assert content is None and [c["function"]["name"] for c in calls] == ["now", "get_weather"]
    assert answer.finish_reason("stop") == "tool_calls" and answer.finish_reason("length") == "length"
    for forced in (required, named):  # ids as the server's parser makes them: Mistral's templates want 9 characters
        answer = ToolAnswer(forced.tool_use, "mistral")
        _, calls = answer.whole('[{"name": "now", "parameters": {}}]' if forced is required else '{"city": "x"}')
        assert len(calls) == 1 and len(calls[0]["id"]) == 9 and calls[0]["id"].isalnum()
    cut = ToolAnswer(required.tool_use, None)
    assert cut.whole('[{"name": "now", "par') == ('[{"name": "now", "par', [])  # cut off: shown as it is

    auto = openai_api.parse_body(openai_api.CHAT, chat_body(tools=TOOLS))
    assert auto.tool_use.choice == "auto" and auto.params.structured_outputs is None
    none = openai_api.parse_body(openai_api.CHAT, chat_body(tools=TOOLS, tool_choice="none"))
    assert ToolAnswer(none.tool_use, None).whole(hermes_call("now", {})) == (hermes_call("now", {}), [])
    assert openai_api.parse_body(openai_api.CHAT, chat_body(tools=[], tool_choice="none")).tool_use is None


@pytest.mark.parametrize("url, fields, message", [
    (openai_api.CHAT, {"tool_choice": "required"}, "tool_choice \"required\" needs tools"),
    (openai_api.CHAT, {"tools": TOOLS, "tool_choice": "any"}, "tool_choice must be \"none\", \"auto\""),
    (openai_api.CHAT, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names the function \"nope\", which is not in tools"),
    (openai_api.CHAT, {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "forces the answer's form, and so does response_format"),
    (openai_api.CHAT, {"tools": [{"type": "function", "function": {}}]}, r"tools\[0\].function must be"),
    (openai_api.COMPLETIONS, {"prompt": "x", "tools": TOOLS}, "tools .* is not supported"),
    *[(openai_api.CHAT, {"tools": TOOLS, "tool_choice": choice}, "tool_choice must be")
      for choice in ({"type": "function", "function": "get_weather"}, {"type": "function", "function": None}, 5, [],
                     True, {"function": {"name": "now"}})],
    (openai_api.CHAT, {"tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]},
     r"tools\[0\] is not valid Unicode text"),
    (openai_api.CHAT, {"tools": [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "$defs": {"A": {"type": t}}}}} for n, t in (("f", "string"), ("g", "integer"))],
        "tool_choice": "required"}, "tools define \\$defs \"A\" differently"),
])
def test_bad_tool_fields_are_refused_by_name(url, fields, message):
    body = chat_body(**fields) if url == openai_api.CHAT else fields
    with pytest.raises(ValueError, match=message):
        openai_api.parse_body(url, body)


def test_tool_messages_in_a_body_name_their_place():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                       "function": {"name": "f", "arguments": "{bad"}}]}]
    with pytest.raises(ValueError, match=r"^messages\[1\].tool_calls\[0\].function.arguments is not valid JSON"):
        openai_api.parse_body(openai_api.CHAT, {"messages": messages})
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"ok": true}'
    parsed = openai_api.parse_body(openai_api.CHAT, {"messages": messages})
    assert parsed.messages[1]["tool_calls"][0]["function"]["arguments"] == {"ok": True}
    with pytest.raises(ValueError, match=r"unknown field messages\[0\].tool_id"):
        openai_api.parse_body(openai_api.CHAT, {"messages": [{"role": "tool", "tool_id": "c", "content": "x"}]})
    with pytest.raises(ValueError, match=r"messages\[0\].tool_call_id is not valid Unicode text"):
        openai_api.parse_body(openai_api.CHAT, {"messages": [{"role": "tool", "tool_call_id": "\udc00", "content": "x"}]})
    # An answer sent back in the history, with the empty keys OpenAI's and vLLM's answers carry.
    answer = {"role": "assistant", "content": None, "refusal": None, "function_call": None, "audio": None,
              "annotations": [], "tool_calls": messages[1]["tool_calls"]}
    assert openai_api.parse_body(openai_api.CHAT, {"messages": [answer]}).messages[0]["tool_calls"][0]["id"] == "c"
    with pytest.raises(ValueError, match=r"unknown field messages\[0\].refusal"):
        openai_api.parse_body(openai_api.CHAT, {"messages": [{**answer, "refusal": "no"}]})


def test_required_moves_each_tools_defs_to_the_root_where_their_references_point():
    import jsonschema

    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    parameters = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}}, "required": ["at"],
                  "$defs": {"Place": place}}  # as pydantic writes a nested model
    tools = [{"type": "function", "function": {"name": n, "parameters": parameters}} for n in ("go", "stay")]
    body = openai_api.parse_body(openai_api.CHAT, chat_body(tools=tools, tool_choice="required"))
    body.params.structured_outputs.check()
    schema = json.loads(body.params.structured_outputs.json)
    assert schema["$defs"] == {"Place": place}
    jsonschema.validate([{"name": "go", "parameters": {"at": {"city": "Oslo"}}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "go", "parameters": {"at": {}}}], schema)
