"""What the OpenAI-style API speaks: the request bodies (`ChatRequest`, `CompletionRequest`, `Feedback`) and
the error every refusal answers with (`APIError`, in OpenAI's shape)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    @classmethod
    def crashed(cls, exc: Exception) -> APIError:
        message = f"The server failed on this request ({type(exc).__name__}); its log has the details."
        return cls(500, message, "server_error")


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = 1
    stream: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Feedback(BaseModel):
    id: str = Field(max_length=200)
    rating: Literal["up", "down"] | None = None
    correction: str | None = None  # the reviewer's answer; needs the reviewer key
    user: str | None = Field(None, max_length=200)  # the end user the client answered, as OpenAI's `user`
