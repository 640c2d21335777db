"""Request and response bodies of the reference server's scoring routes: `/score`,
`/rerank` (Jina / Cohere v1 shape), `/v2/rerank` (Cohere v2), `/classify` and `/pooling`."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from rest_bridge.openai_schemas.request_fields import (
    Count,
    Int32,
    OpenAIModel,
    PositiveCount,
    TokenId,
)

_Text = Annotated[str, Field(min_length=1)]
_Texts = Annotated[list[_Text], Field(min_length=1)]
_TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class ScoreRequest(OpenAIModel):
    model: str | None = None
    # One text_1 is scored against every text_2; otherwise the lists pair up in order.
    text_1: _Text | _Texts
    text_2: _Text | _Texts
    truncate_prompt_tokens: PositiveCount | None = None
    priority: Int32 | None = 0


class RerankRequest(OpenAIModel):
    model: str | None = None
    query: _Text
    documents: _Texts
    # The best top_n documents; 0 or unset: all of them (a negative top_n is refused too).
    top_n: Count | None = None
    # Default true (Jina/Cohere v1); the Cohere v2 route answers without documents unless true.
    return_documents: bool | None = None
    truncate_prompt_tokens: PositiveCount | None = None
    priority: Int32 | None = 0


class ClassifyRequest(OpenAIModel):
    model: str | None = None
    input: _Text | _Texts
    truncate_prompt_tokens: PositiveCount | None = None
    add_special_tokens: bool | None = None
    priority: Int32 | None = 0


class PoolingRequest(OpenAIModel):
    model: str | None = None
    input: _Text | _Texts | _TokenIds | Annotated[list[_TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    truncate_prompt_tokens: PositiveCount | None = None
    add_special_tokens: bool | None = None
    priority: Int32 | None = 0


class ScoringUsage(OpenAIModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreData(OpenAIModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoringUsage


class RerankDocument(OpenAIModel):
    text: str


class RerankResult(OpenAIModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(OpenAIModel):
    total_tokens: int


class RerankResponse(OpenAIModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


class CohereBilledUnits(OpenAIModel):
    search_units: int


class CohereMeta(OpenAIModel):
    api_version: dict[str, str]
    billed_units: CohereBilledUnits
    tokens: dict[str, int]


class CohereRerankResponse(OpenAIModel):
    id: str
    results: list[RerankResult]
    meta: CohereMeta


class ClassifyData(OpenAIModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ScoringUsage


class PoolingData(OpenAIModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | str


class PoolingResponse(OpenAIModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: ScoringUsage
