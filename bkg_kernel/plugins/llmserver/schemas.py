"""Wire models of llmserver: the OpenAI request and response shapes (chat, completions, embeddings)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from bkg_kernel.strict import StrictTypes

MAX_TOKENS_CAP = 32_768
MAX_STOPS, MAX_STOP = 16, 512  # stop strings: how many, how long
MAX_BIASES = 300  # logit_bias entries, as OpenAI's API takes
# A text to continue or embed: an empty one is refused by the plugin with OpenAI's 400 (not pydantic's 422), and
# the schema says so, so that generated clients and fuzzers know it.
Text = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]


class Message(BaseModel):
    """One chat message (OpenAI shape; content may be text or a list of text parts)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Return the content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


# OpenAI's tool shape, stated in the schema as `_tools` below checks it (extra keys are allowed, as OpenAI's are)
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
        },
    },
}


# OpenAI's nullable fields whose default is a value: their null is read as that default (OpenAI's other nullable
# fields default to null here as well)
NULL_IS_DEFAULT = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "stream", "n", "echo")
TOKEN_IDS = "token ids are not accepted (this server's model has its own tokenizer): send text"
# LangChain's OpenAIEmbeddings splits texts with tiktoken and sends its token ids unless told not to
EMBED_TOKEN_IDS = f"{TOKEN_IDS} (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"


def _token_ids(value: Any) -> bool:
    """Whether `value` is OpenAI's token-id form of a text input: a list of integers, or a list of such lists."""

    def ids(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    return ids(value) or (isinstance(value, list) and bool(value) and all(ids(v) for v in value))


class Sampling(StrictTypes):
    """Sampling options shared by chat and completions."""

    # OpenAI clients send fields we ignore (user, n=1, logprobs...), kept; types as OpenAI's API reads them: "5" is
    # not the number 5 nor `true` 1 (a 400 naming the field), a number is finite (JSON has no Infinity)
    model: str | None = Field(None, description="A registered model id; default: the plugin's default model.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    # OpenAI's nullable fields: null is the default (`NULL_IS_DEFAULT`), as OpenAI reads it
    temperature: float | None = Field(0.8, ge=0, le=2)
    top_p: float | None = Field(
        0.95, ge=0, le=1, description="Nucleus sampling; 0 keeps only the most likely token (greedy), 1 turns it off."
    )
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.05, ge=0, le=1)
    repeat_penalty: float = Field(
        1.1, gt=0, description="Penalty on the last 64 tokens' repeats; 1.1 like llama_cpp.server and Ollama (1: none)."
    )
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} strings of up to {MAX_STOP} characters.")
    stream: bool | None = False
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> a bias from -100 to 100 added to its logit (-100 bans it)."
    )

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """OpenAI's shape: up to 300 token ids, each written as a whole number, each bias within -100..100."""
        if value is None:
            return value
        if len(value) > MAX_BIASES:
            raise ValueError(f"at most {MAX_BIASES} token ids")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"{key!r} is not a token id (a whole number, written as a string)")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias:g}; biases go from -100 to 100")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: Any) -> Any:
        """Each token is checked against every stop string's every prefix: their number and length are bounded."""
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(len(s) > MAX_STOP for s in stops):
            raise ValueError(f"a stop string holds at most {MAX_STOP} characters")
        return value

    n: int | None = Field(1, ge=1, le=1, description="Only n=1 is supported.")

    @field_validator(*NULL_IS_DEFAULT, check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's nullable fields: `null` (the openai SDK's `temperature=None`, LangChain's unset options) is the
        field's default, so that the code reads a value."""
        return cls.model_fields[str(info.field_name)].default if value is None else value

    def stops(self) -> list[str]:
        """Return the stop strings as a list."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def limit(self) -> int | None:
        """Return the requested completion token limit."""
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(Sampling):
    """`llm.chat` / POST /v1/chat/completions."""

    # arrays refused as the body is read, before pydantic walks them (the gateway's CheckedJSONRoute)
    MAX_ITEMS: ClassVar[dict[str, int]] = {"messages": 10_000, "tools": 1_000, "stop": 64}
    MAX_BODY_BYTES: ClassVar[int] = 8 * 2**20  # a whole context window is far less

    messages: list[Message] = Field(..., min_length=1)
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}}'
    )
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"items": TOOL_SCHEMA})
    tool_choice: str | dict[str, Any] | None = None
    template: str | None = Field(None, description="A named chat template from the settings instead of the GGUF's.")

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be text, json_object or json_schema")
        if v is not None and v.get("type") == "json_schema":
            spec = v.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("json_schema must be an object whose schema is a JSON Schema object")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be none, auto, required or {type: function, function: {name}}")
        if isinstance(v, dict):
            fn = v.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError('tool_choice must name its function: {"type": "function", "function": {"name": ...}}')
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, t in enumerate(v or []):
            fn = t.get("function")
            if (
                t.get("type", "function") != "function"
                or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)
                or not fn["name"]
                or not isinstance(fn.get("parameters", {}), dict)
                or not isinstance(fn.get("description", ""), str)
            ):
                raise ValueError(
                    f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}"
                )
        return v


class CompletionRequest(Sampling):
    """`llm.complete` / POST /v1/completions."""

    # a list prompt is one text, or token ids (refused with a word on them, not as a list too long)
    MAX_ITEMS: ClassVar[dict[str, int]] = {"prompt": MAX_TOKENS_CAP, "stop": 64}
    MAX_BODY_BYTES: ClassVar[int] = 8 * 2**20

    prompt: Text | list[Text] = Field(
        ...,
        description="Text to continue (a list must hold exactly one string).",
        json_schema_extra={"minItems": 1, "maxItems": 1},
    )
    echo: bool | None = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        """Token ids, or a list of more than one text, refused before each item is looked at."""
        if _token_ids(v):
            raise PydanticCustomError("token_ids", TOKEN_IDS)
        if isinstance(v, list) and len(v) != 1:
            raise PydanticCustomError("one_prompt", "a list prompt must hold exactly one string")
        return v

    def text(self) -> str:
        """Return the prompt text."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbedRequest(StrictTypes):
    """`llm.embed` / POST /v1/embeddings."""

    MAX_ITEMS: ClassVar[dict[str, int]] = {"input": 2048}
    MAX_BODY_BYTES: ClassVar[int] = 2**40  # up to the gateway's max_body_mb
    model: str | None = None
    input: Text | list[Text] = Field(
        ..., description="One text or a batch of texts.", json_schema_extra={"minItems": 1, "maxItems": 2048}
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if _token_ids(v):
            raise PydanticCustomError("token_ids", EMBED_TOKEN_IDS)
        if isinstance(v, list) and not v:
            raise PydanticCustomError("no_input", "input must hold at least one text")
        if isinstance(v, list) and len(v) > 2048:
            raise PydanticCustomError("too_many_inputs", "input may hold at most 2048 texts")
        return v

    def texts(self) -> list[str]:
        """Return the inputs as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    """Exact token counts."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI chat.completion."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage


class Completion(BaseModel):
    """OpenAI text_completion."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage


class Embeddings(BaseModel):
    """OpenAI embedding list."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    model: str
    usage: Usage


class ModelRef(BaseModel):
    """Which model to load or unload."""

    model: str | None = None
    keep_alive: float | None = Field(None, description="Seconds to keep it loaded when idle; -1 forever, 0 unload now.")
    embedding: bool = False


class ModelList(BaseModel):
    """Registered GGUF models and which are loaded."""

    models: list[dict[str, Any]]
    memory_budget_mb: int
    memory_used_mb: float
