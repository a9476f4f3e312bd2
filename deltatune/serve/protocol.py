"""The wire format of `deltatune serve`: pydantic models of the OpenAI-compatible requests
(completions, chat completions, run-time adapter loading) and `ApiError`, the one way a request
fails, which becomes OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}` with
an HTTP status.

Requests are validated strictly (a number sent as a string, a float `max_tokens` or `true` for
an integer are refused, not coerced) so that a client bug shows up as a clear 400 instead of a
surprising answer; fields the server does not know are ignored, as OpenAI-compatible servers
do."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error"}

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)   # what torch.Generator.manual_seed accepts


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON for an HTTP status."""
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code}}


class ApiError(Exception):
    """A request that cannot be served: HTTP `status` plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _SamplingFields(_Strict):
    """What completions and chat completions share."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    n: int = 1
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    prompt: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterLoadRequest(_Strict):
    name: str
    path: str


__all__ = ["ApiError", "error_body", "error_type", "CompletionRequest", "ChatMessage",
           "ChatCompletionRequest", "AdapterLoadRequest"]
