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

from bkg_kernel.errors import ContextTooLong, InvalidInput
from bkg_kernel.plugins.llmserver.pool import Loaded
from bkg_kernel.plugins.llmserver.schemas import ChatRequest, Sampling

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
        default_max_tokens: int = 512,
        max_tokens_limit: int | None = None,
        add_bos: bool = False,
    ) -> None:
        self.llm, self.m, self.req, self.cancelled, self.grammar = llm, m, req, cancelled, grammar
        if grammar is not None:
            _parses(grammar, llm)
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
        """Yield text as it is generated (held back while it could still become a stop string)."""
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
            if safe > sent:
                yield self.text[sent:safe]
                sent = safe
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


def grammar_for(req: ChatRequest) -> Any:
    """Return the llama.cpp grammar that constrains this answer (JSON mode, JSON Schema, forced tool call)."""
    if forced_tool(req):
        for i, t in enumerate(active_tools(req)):
            _bounded(t["function"].get("parameters") or {}, f"tools[{i}].function.parameters")
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": t["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in active_tools(req)
        ]
        return _grammar(json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls}, sort_keys=True))
    fmt = req.response_format or {}
    if fmt.get("type") == "json_object":
        return _grammar("")
    if fmt.get("type") == "json_schema":
        schema = fmt["json_schema"]["schema"]
        _bounded(schema, "response_format.json_schema.schema")
        return _grammar(json.dumps(schema, sort_keys=True))
    return None


MAX_BOUND = 100_000  # a length or count a schema may ask for (characters: no answer is longer than that here)
MAX_BOUNDS = 1_000_000  # all of a schema's lengths and counts together: the grammar spells each one out
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_SUBSCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _bounded(schema: Any, at: str) -> None:
    """422 naming where, for a schema whose lengths and counts would make the grammar huge: the converter writes
    each repetition out, so `{"type": "string", "minLength": 100000000}`, a few bytes of JSON, was gigabytes of
    grammar. Only schema keywords are walked (not `examples`, `default`, `enum`, `const`)."""
    total = 0

    def walk(node: Any, where: str) -> None:
        nonlocal total
        if not isinstance(node, dict):
            return
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


def _parses(grammar: Any, llm: Any) -> None:
    """422 (`response_format`) for a grammar llama.cpp will not parse: llama-cpp-python does not look whether its
    sampler was made, and samples through a null one (the worker died of SIGSEGV for `maxLength` 1500: llama.cpp
    refuses a repetition that large). Tried once per grammar (they are cached per schema)."""
    import llama_cpp

    if getattr(grammar, "_bkg_parses", False):
        return
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar._grammar.encode(), grammar._root.encode())  # noqa: SLF001
    if not sampler:
        raise InvalidInput("llama.cpp cannot use the grammar this JSON Schema makes (a length or count too large for "
                           "it to repeat: lower maxLength / maxItems)", field="response_format")  # fmt: skip
    llama_cpp.llama_sampler_free(sampler)
    grammar._bkg_parses = True


@lru_cache(maxsize=64)
def _grammar(schema: str) -> Any:
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    try:
        if not schema:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(schema, verbose=False)
    except Exception as exc:
        raise InvalidInput(f"the JSON Schema cannot be turned into a grammar: {exc}", field="response_format") from None


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
