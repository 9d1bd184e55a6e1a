"""A small blocking client for the server's health and lifecycle endpoints (standard library only)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

QUICK_TIMEOUT = 3.0
# Switching loads the model before answering, which takes as long as the model is big.
SWITCH_TIMEOUT = 900.0


class ApiError(Exception):
    """The server answered with an error envelope."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServerUnreachable(Exception):
    """Nothing (or nothing healthy) answers at the base URL."""


class ServerClient:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def health(self) -> dict:
        return self._request("GET", "/health")

    def status(self) -> dict:
        return self._request("GET", "/api/models/status")

    def models(self) -> list[dict]:
        return self._request("GET", "/api/models/list")["data"]

    def switch(self, model_id: str) -> dict:
        return self._request("POST", "/api/models/switch", {"model": model_id}, timeout=SWITCH_TIMEOUT)

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = QUICK_TIMEOUT) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except ValueError as exc:
            raise ServerUnreachable(f"something other than Impetus answers at {self.base_url}") from exc
        except urllib.error.HTTPError as exc:
            raise ApiError(error_message(exc), exc.code) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise ServerUnreachable(f"no server answers at {self.base_url} ({exc})") from exc


def error_message(error: urllib.error.HTTPError) -> str:
    """The OpenAI envelope's message, or the bare HTTP status when the body is not one."""
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.code} {error.reason}"
