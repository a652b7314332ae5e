"""The OpenAI-compatible bodies: the chat completions and models endpoints
(api/routes/completions.py), and the token completions a remote drafting backend sends to a
draftloop server (api/routes/serving.py)."""

from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field

from api.schemas import EXAMPLE_EMAIL, Text


# The chat completions endpoint: the fields OpenAI's chat completions API defines that draftloop
# uses; others a client sends are ignored.
class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "champion", "messages": [{"role": "user", "content": EXAMPLE_EMAIL["body"]}]}]
        }
    )

    model: str = Field(
        pattern=r"^(base|champion|v[0-9]{1,9})$",
        description="base, champion, or v<N>: an adapter version of your tenant (GET /v1/models lists them)",
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    temperature: float | None = Field(None, description="Only 0: decoding is greedy")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0, description="As vLLM's extra parameter")
    n: int | None = Field(None, description="Only 1")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    adapter_scale: float | None = Field(description="The scale the adapter was applied at; null for the base model")
    choices: list[dict]
    usage: dict


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


TokenId = Annotated[int, Interval(ge=0, le=2**31 - 1)]


class TokenCompletionRequest(BaseModel):
    """The subset of vLLM's /v1/completions the remote drafting backend sends (agent/remote.py)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "tenant-3-v0002-5f0c9a1e77b2",
                    "prompt": [1, 9690, 198, 2683],
                    "max_tokens": 256,
                    "stream": True,
                    "stop_token_ids": [2],
                    "return_token_ids": True,
                }
            ]
        }
    )

    model: str = Field(
        max_length=200, description="base, or an adapter's served name (tenant-<id>-v<NNNN>-<hash>[-s<scale>])"
    )
    prompt: list[TokenId] = Field(min_length=1, description="The prompt as token ids of the base model's tokenizer")
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(None, description="Only 0: decoding is greedy")
    stream: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list, description="Only the model's end-of-turn ids")
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=64)
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    base_fingerprint: str | None = Field(None, max_length=64, description="Refused unless it is this server's")
