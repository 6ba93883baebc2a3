"""Text generation on one llama.cpp context: chat templates, sampling, stop strings, grammars, tool calls.

Our own token loop over `Llama.generate` (rather than `create_chat_completion`) so usage counts are exact in
streams too, a cancelled request stops between two tokens, and stop strings never leak into the output.
"""

from __future__ import annotations

import codecs
import json
import math
import random
import threading
import uuid
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from bkg_kernel.errors import ContextTooLong, InvalidInput
from bkg_kernel.plugins.llmserver.pool import Loaded
from bkg_kernel.plugins.llmserver.schemas import ChatRequest, CompletionRequest, Sampling

TOOL_PROMPT = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{{"name": <tool name>, "arguments": <arguments object>}} and nothing else.\nTools:\n{tools}'
)


class Generation:
    """One request's generation; iterate `run()` for text deltas, then read the counts and finish reason."""

    def __init__(
        self,
        llm: Any,
        m: Loaded,
        prompt: str,
        req: Sampling,
        cancelled: threading.Event,
        *,
        grammar: Any = None,
        grammar_field: str = "response_format",
        logit_bias: dict[str, float] | None = None,
        default_max_tokens: int = 512,
        max_tokens_limit: int | None = None,
        add_bos: bool = False,
    ) -> None:
        self.llm, self.m, self.req, self.cancelled, self.grammar = llm, m, req, cancelled, grammar
        if grammar is not None:
            _parses(grammar, llm, grammar_field)
        self.bias = _biased(logit_bias, llm) if logit_bias else None
        self.tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        self.prompt_tokens = len(self.tokens)
        if self.prompt_tokens >= m.n_ctx:
            raise ContextTooLong(
                f"the prompt is {self.prompt_tokens:,} tokens; model {m.model_id!r} has a context of {m.n_ctx:,} "
                "(n_ctx) and needs room to answer",
                field="messages" if isinstance(req, ChatRequest) else "prompt",
            )
        room = m.n_ctx - self.prompt_tokens
        self.max_tokens = min(req.limit() or default_max_tokens, max_tokens_limit or room, room)
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.text = ""

    def run(self) -> Iterator[str]:
        """Yield text as it is generated (held back while it could still become a stop string): one piece per
        token, "" for a token whose text is held back, so that a stream can tell its count as it goes."""
        import llama_cpp

        llm, req = self.llm, self.req
        llm.set_seed(req.seed if req.seed is not None else random.getrandbits(31))
        if req.seed is not None:
            # Reusing the previous request's KV cache evaluates the prompt in different batches, and the float
            # results differ enough to flip near ties: a seeded request evaluates its prompt from scratch so
            # that equal requests give equal answers (llama.cpp server's cache_prompt trade-off).
            llm.reset()
        stops = req.stops()
        vocab = llm._model.vocab  # noqa: SLF001 - needed for the end-of-generation test
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sent = 0
        if self.max_tokens <= 0:
            self.finish_reason = "length"
            return
        for tok in llm.generate(
            self.tokens,
            temp=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repeat_penalty=req.repeat_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            grammar=self.grammar,
            logits_processor=self.bias,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                self.finish_reason = "stop"
                break
            self.completion_tokens += 1
            self.text += decoder.decode(llm.detokenize([tok]))
            cut = _find_stop(self.text, stops, sent)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                break
            safe = len(self.text) - _held_back(self.text, stops)
            yield self.text[sent:safe] if safe > sent else ""
            sent = max(sent, safe)
            if self.completion_tokens >= self.max_tokens:
                self.finish_reason = "length"
                break
            if self.cancelled.is_set():
                self.finish_reason = "cancelled"
                break
        # what the decoder still holds is the start of a character the model never finished (cut at a stop string,
        # the token limit or a cancel): not text, so not a U+FFFD either (as llama.cpp's server drops it)
        if len(self.text) > sent:
            yield self.text[sent:]

    def usage(self) -> dict[str, int]:
        """Return exact token counts."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _biased(bias: dict[str, float], llm: Any) -> list[Any]:
    """OpenAI's `logit_bias` as llama-cpp-python's logits processor: each token's logit moved by its bias (-100
    bans it, 100 all but forces it); a token id the model does not have is a 422 naming it."""
    n_vocab = int(llm.n_vocab())
    shifts: dict[int, float] = {}
    for key, value in bias.items():
        if int(key) >= n_vocab:
            raise InvalidInput(f"logit_bias: token {key} is not in the model's vocabulary (0 to {n_vocab - 1})",
                               field=f"logit_bias.{key}")  # fmt: skip
        shifts[int(key)] = value
    ids = np.fromiter(shifts, dtype=np.intc, count=len(shifts))
    by = np.fromiter(shifts.values(), dtype=np.float32, count=len(shifts))

    def biased(_input_ids: Any, scores: Any) -> Any:
        out = np.array(scores, dtype=np.float32)
        out[ids] += by
        return out

    return [biased]


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    best = None
    for s in stops:
        i = text.find(s, max(0, sent - len(s)))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could be the start of a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


# -- what this path cannot do -----------------------------------------------------------------------
def refuse_unsupported(req: Sampling, model_id: str) -> None:
    """422 (OpenAI's 400 on /v1) naming a field this local path would otherwise ignore while the caller expects it
    to act: a picture or a sound in a message or asked for (the model reads and writes text), a forced tool with no
    tools, the legacy `functions`, `logprobs`, a completion's `suffix` or `best_of`, `stream_options` on a request
    that does not stream (as OpenAI refuses it). OpenAI's fields that change nothing here (`user`, `store`,
    `prediction`) pass."""
    extra = req.model_extra or {}
    if extra.get("stream_options") is not None and not req.stream:
        raise InvalidInput("stream_options is only allowed when stream is true", field="stream_options")
    if isinstance(req, ChatRequest):
        for i, msg in enumerate(req.messages):
            for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
                kind = part.get("type", "text")
                if kind != "text":
                    raise InvalidInput(f"messages[{i}].content[{j}] is of type {kind!r}: model {model_id!r} reads "
                                       "text only", field=f"messages[{i}].content[{j}]")  # fmt: skip
        if (req.tool_choice == "required" or isinstance(req.tool_choice, dict)) and not req.tools:
            raise InvalidInput("tool_choice asks for a tool call, but the request has no tools", field="tool_choice")
        modalities = extra.get("modalities")
        if isinstance(modalities, list) and any(m != "text" for m in modalities):
            raise InvalidInput(f"model {model_id!r} answers in text only: modalities can only be ['text']",
                               field="modalities")  # fmt: skip
        for old, new in (("functions", "tools"), ("function_call", "tool_choice")):
            if extra.get(old) is not None:
                raise InvalidInput(f"{old} (OpenAI's deprecated form) is not supported: send {new}", field=old)
        if _given(extra.get("logprobs")):
            raise InvalidInput("logprobs are not returned by this server: leave logprobs out", field="logprobs")
        if extra.get("top_logprobs") not in (None, 0):
            raise InvalidInput("logprobs are not returned by this server: leave top_logprobs out", field="top_logprobs")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise InvalidInput("suffix (text to insert before) is not supported: leave it out", field="suffix")
        if _given(extra.get("logprobs")):  # 0 too: the chosen tokens' own logprobs
            raise InvalidInput("logprobs are not returned by this server: leave logprobs out", field="logprobs")
        if extra.get("best_of") not in (None, 1):
            raise InvalidInput("best_of is not supported (one completion is made): leave it out", field="best_of")


def _given(value: Any) -> bool:
    return value is not None and value is not False


# -- prompts ----------------------------------------------------------------------------------------
def chat_prompt(m: Loaded, req: ChatRequest, templates: dict[str, str], model_templates: dict[str, str]) -> str:
    """Render the messages with the model's chat template (or a named one from the settings)."""
    name = req.template or model_templates.get(m.model_id)
    if name is not None:
        if name not in templates:
            known = ", ".join(sorted(templates)) or "none"
            raise InvalidInput(f"no chat template named {name!r} in the settings (known: {known})", field="template")
        template = templates[name]
    elif m.template:
        template = m.template
    else:
        raise InvalidInput(
            f"model {m.model_id!r} has no chat template in its GGUF: name one in the settings (templates)",
            field="template",
        )
    messages = [_message_dict(msg) for msg in req.messages]
    tools = active_tools(req)
    if tools:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        note = TOOL_PROMPT.format(tools=listing)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}
        else:
            messages.insert(0, {"role": "system", "content": note})
    try:
        fmt = _formatter(template, m.eos, m.bos)
        return str(fmt(messages=messages, tools=tools or None).prompt)
    except Exception as exc:  # a template error (raise_exception in the template, bad Jinja)
        raise InvalidInput(f"the chat template could not render these messages: {exc}", field="messages") from None


@lru_cache(maxsize=32)
def _formatter(template: str, eos: str, bos: str) -> Any:
    """Compile a chat template once (~5 ms each time otherwise, on every request's time to first token)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    except Exception as exc:
        raise InvalidInput(f"the chat template does not compile: {exc}", field="template") from None


def _message_dict(msg: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": msg.text()}
    if msg.tool_calls:
        d["tool_calls"] = msg.tool_calls
        if not d["content"]:
            d["content"] = json.dumps([tc.get("function", tc) for tc in msg.tool_calls])
    if msg.tool_call_id:
        d["tool_call_id"] = msg.tool_call_id
    if msg.name:
        d["name"] = msg.name
    return d


# -- grammars and tools -----------------------------------------------------------------------------
def active_tools(req: ChatRequest) -> list[dict[str, Any]]:
    """Return the tools the model may call ([] when tool_choice is 'none')."""
    if not req.tools or req.tool_choice == "none":
        return []
    choice = req.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in req.tools if t["function"]["name"] == name]
        if not chosen:
            raise InvalidInput(f"tool_choice names {name!r}, which is not in tools", field="tool_choice")
        return chosen
    return list(req.tools)


def forced_tool(req: ChatRequest) -> bool:
    """Return whether the answer must be a tool call."""
    return bool(active_tools(req)) and (req.tool_choice == "required" or isinstance(req.tool_choice, dict))


def grammar_for(req: ChatRequest) -> tuple[Any, str]:
    """Return the llama.cpp grammar that constrains this answer (JSON mode, JSON Schema, forced tool call), and the
    field a grammar llama.cpp refuses is blamed on."""
    if forced_tool(req):
        names = {t["function"]["name"] for t in active_tools(req)}
        fields = [f"tools[{i}].function.parameters" for i, t in enumerate(req.tools or [])
                  if t["function"]["name"] in names]  # fmt: skip
        for t, at in zip(active_tools(req), fields, strict=True):
            params = held_ranges(parameters(t))
            _checked(params, at)
            _grammar(json.dumps(params), at)  # each converted alone: a failure names its tool
        # the name before the arguments, as the prompt asks and OpenAI writes it: the converter keeps the schema's
        # order of properties, so the schema's text is never key-sorted (sorted, `arguments` came first)
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": held_ranges(parameters(t))},
                "required": ["name", "arguments"],
            }
            for t in active_tools(req)
        ]
        at = fields[0] if len(fields) == 1 else "tools"
        return _grammar(json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls}), at), at
    fmt = req.response_format or {}
    if fmt.get("type") == "json_object":
        return _grammar("", "response_format"), "response_format"
    if fmt.get("type") == "json_schema":
        schema = held_ranges(fmt["json_schema"]["schema"])
        _checked(schema, "response_format.json_schema.schema")
        # the schema's own order of properties is the answer's (`reasoning` before the `answer` it leads to)
        return _grammar(json.dumps(schema), "response_format"), "response_format"
    return None, "response_format"


NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def parameters(tool: dict[str, Any]) -> dict[str, Any]:
    """Return the JSON Schema of a tool's arguments: a function declared without `parameters` (or with `{}`) takes
    none, as OpenAI reads it, so its arguments are `{}`."""
    params: dict[str, Any] | None = tool["function"].get("parameters")
    return params or NO_ARGUMENTS


MAX_BOUND = 100_000  # a length or count a schema may ask for (characters: no answer is longer than that here)
MAX_BOUNDS = 1_000_000  # all of a schema's lengths and counts together: the grammar spells each one out
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems")
_SUBSCHEMAS = ("properties", "$defs", "definitions")  # name -> schema
_SUBSCHEMA = ("items", "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
# What llama-cpp-python's JSON-Schema-to-grammar converter skips without a word: an answer would break them and
# still end with finish_reason "stop", so a schema that has them is refused (the caller checks those rules itself)
UNENFORCED = (
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",  # numbers: any number passes
    "uniqueItems", "contains", "minContains", "maxContains", "unevaluatedItems",
    "minProperties", "maxProperties", "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas",
    "dependencies", "unevaluatedProperties", "not", "if", "then", "else",
)  # fmt: skip
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")  # the ones it writes


MAX_INT_CHOICES = 1_000  # an integer range the grammar holds as the list of its values
MAX_CHOICES = 20_000  # enum values in one schema, held ranges' included: the grammar spells each one out
_NUMBER_RULES = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def held_ranges(schema: Any) -> Any:
    """The schema with each integer range the converter would skip (it writes any integer for `minimum` and
    `maximum`) made the list of its values: `{"type": "integer", "minimum": 1, "maximum": 5}` is held as
    `{"enum": [1, 2, 3, 4, 5]}`, for a range with both ends and at most `MAX_INT_CHOICES` values (what a rating, a
    percentage or a year asks for). Other number rules stay, and `_checked` refuses them. A copy; the original is
    left as it is."""
    if isinstance(schema, list):
        return [held_ranges(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: (
            {n: held_ranges(sub) for n, sub in v.items()} if k in _SUBSCHEMAS and isinstance(v, dict)
            else held_ranges(v) if k in _SUBSCHEMA or k in _SCHEMA_LISTS
            else v
        )
        for k, v in schema.items()
    }  # fmt: skip
    values = _range_values(out)
    if values is None:
        return out
    return {**{k: v for k, v in out.items() if k not in (*_NUMBER_RULES, "type")}, "enum": values}


def _range_values(node: dict[str, Any]) -> list[int] | None:
    """The values of an integer node's range, or None when it is not one `held_ranges` holds."""
    if node.get("type") != "integer" or "enum" in node or "const" in node:
        return None
    rules = {k: node[k] for k in _NUMBER_RULES if k in node}
    if not rules or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                        for v in rules.values()):  # fmt: skip
        return None
    lows = [math.ceil(rules["minimum"])] if "minimum" in rules else []
    lows += [math.floor(rules["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in rules else []
    highs = [math.floor(rules["maximum"])] if "maximum" in rules else []
    highs += [math.ceil(rules["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in rules else []
    if not lows or not highs:
        return None
    lo, hi = max(lows), min(highs)
    if hi < lo or hi - lo + 1 > MAX_INT_CHOICES:
        return None
    step = rules.get("multipleOf")
    if step is not None and step <= 0:
        return None
    values = [v for v in range(lo, hi + 1) if step is None or math.isclose(v / step, round(v / step))]
    return values or None


def _checked(schema: Any, at: str) -> None:
    """422 naming where (`<at>.properties.n.minimum`), for a schema the grammar would not hold an answer to: a
    keyword the converter skips (`UNENFORCED`, a string `format` it does not know, lengths beside a `pattern` or
    `format`, counts of a tuple), or lengths and counts that would make the grammar huge (the converter writes
    each repetition out: `{"type": "string", "minLength": 100000000}`, a few bytes of JSON, was gigabytes of
    grammar), or more enum values than `MAX_CHOICES` in all. Only schema keywords are walked (not `examples`,
    `default`, `const`)."""
    total = total_choices = 0

    def refuse(where: str, key: str, why: str = "") -> None:
        if key in _NUMBER_RULES and not why:
            why = (f" (an integer's range is held when it has both ends and at most {MAX_INT_CHOICES:,} values; "
                   "a number's is not)")  # fmt: skip
        raise InvalidInput(f"{where}.{key} is not enforced{why}: llama.cpp's grammar would let an answer break it "
                           "(remove it, and check that rule yourself)", field=f"{where}.{key}")  # fmt: skip

    def walk(node: Any, where: str) -> None:
        nonlocal total, total_choices
        if not isinstance(node, dict):
            return
        for key in UNENFORCED:
            if key in node and not (key == "uniqueItems" and node[key] is False):
                refuse(where, key)
        text = node.get("type") in (None, "string")
        fmt = node.get("format")
        if text and isinstance(fmt, str) and fmt not in FORMATS:
            refuse(where, "format", f" for {fmt!r} (only for {', '.join(FORMATS)})")
        for key in ("minLength", "maxLength"):
            if text and key in node and ("pattern" in node or fmt in FORMATS):
                refuse(where, key, f" beside {'pattern' if 'pattern' in node else 'format'}")
        for key in ("minItems", "maxItems"):
            if key in node and (isinstance(node.get("items"), list) or "prefixItems" in node):
                refuse(where, key, " for a tuple (items as a list, or prefixItems)")
        if "prefixItems" in node and "items" in node:
            refuse(where, "prefixItems", " beside items")
        choices = node.get("enum")
        if isinstance(choices, list):  # an enum's, or an integer range `held_ranges` made one of
            total_choices += len(choices)
            if total_choices > MAX_CHOICES:
                raise InvalidInput(f"the schema's enums and integer ranges hold more than {MAX_CHOICES:,} values in "
                                   "all here: the grammar spells each one out (narrow them)", field=where)  # fmt: skip
        for key in _BOUNDS:
            value = node.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or value > MAX_BOUND:
                raise InvalidInput(f"{where}.{key} is {value:g}; a schema's lengths and counts go up to "
                                   f"{MAX_BOUND:,}", field=f"{where}.{key}")  # fmt: skip
            total += int(value)
            if total > MAX_BOUNDS:
                raise InvalidInput(f"the schema's lengths and counts add up past {MAX_BOUNDS:,} here: the grammar "
                                   "would spell each one out", field=f"{where}.{key}")  # fmt: skip
        for key in _SUBSCHEMAS:
            if isinstance(node.get(key), dict):
                for name, sub in node[key].items():
                    walk(sub, f"{where}.{key}.{name}")
        for key in _SUBSCHEMA:
            walk(node.get(key), f"{where}.{key}")
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                for i, sub in enumerate(node[key]):
                    walk(sub, f"{where}.{key}[{i}]")

    walk(schema, at)


def _parses(grammar: Any, llm: Any, field: str) -> None:
    """422 naming `field` (`response_format`, `tools[0].function.parameters`) for a grammar llama.cpp will not
    parse: llama-cpp-python does not look whether its sampler was made, and samples through a null one (the worker
    died of SIGSEGV for `maxLength` 1500: llama.cpp refuses a repetition that large). Tried once per grammar (they
    are cached per schema)."""
    import llama_cpp

    if getattr(grammar, "_bkg_parses", False):
        return
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode(), grammar._root.encode())  # noqa: SLF001
    if not sampler:
        raise InvalidInput("llama.cpp cannot use the grammar this JSON Schema makes (a length or count too large for "
                           "it to repeat: lower maxLength / maxItems)", field=field)  # fmt: skip
    llama_cpp.llama_sampler_free(sampler)
    grammar._bkg_parses = True


@lru_cache(maxsize=64)
def _grammar(schema: str, field: str) -> Any:
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if not schema:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as exc:
        raise InvalidInput(f"the JSON Schema cannot be turned into a grammar: {exc}", field=field) from None


def may_be_tool_call(start: str) -> bool:
    """Whether an answer that begins with `start` may still be a tool call as `tool_calls_from` reads one: a JSON
    object, on its own or after `<tool_call>`."""
    s = start.lstrip()
    tag = "<tool_call>"
    if s.startswith(tag):
        s = s.removeprefix(tag).lstrip()
    elif tag.startswith(s):
        return True
    return not s or s.startswith("{")


def tool_calls_from(text: str, req: ChatRequest) -> list[dict[str, Any]] | None:
    """Parse a tool call the model wrote (forced by grammar, or chosen freely in `auto`)."""
    tools = {t["function"]["name"] for t in active_tools(req)}
    if not tools:
        return None
    body = text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>").strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in tools:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args if isinstance(args, dict) else {})},
        }
    ]
