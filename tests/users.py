"""A real user on 127.0.0.1 for the tests that change routing under load: sends completions, each
as a new user (`user`, the sticky key), until stopped, and counts what came back."""

from __future__ import annotations

import threading
from typing import Any

import httpx

H = "x-mlops-release"


class Users:
    def __init__(
        self,
        url: str,
        model: str = "tiny",
        prompt: str = "abc=",
        max_tokens: int = 4,
        headers: dict[str, str] | None = None,
        pause: float = 0.0,  # between requests: a steady user rather than a flood that starves 2 cores
    ) -> None:
        self.url, self.model, self.prompt, self.max_tokens = url, model, prompt, max_tokens
        self.headers, self.pause = headers or {}, pause
        self.sent = self.ok = 0
        self.errors = 0  # 5xx answers and transport errors: what a user counts as the service failing
        self.failed: list[str] = []  # every answer that was not a 200, and every transport error
        self.releases: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60, trust_env=False, headers=self.headers) as c:
            while not self.stop.is_set():
                self.sent += 1
                body: dict[str, Any] = {
                    "model": self.model,
                    "prompt": self.prompt,
                    "max_tokens": self.max_tokens,
                    "user": f"u{self.sent}",
                }
                try:
                    r = c.post(f"{self.url}/v1/completions", json=body)
                except httpx.HTTPError as e:
                    self.errors += 1
                    self.failed.append(repr(e))
                    continue
                if r.status_code != 200:
                    self.errors += r.status_code >= 500
                    self.failed.append(f"{r.status_code} {r.text[:200]}")
                else:
                    self.ok += 1
                    self.releases.add(r.headers[H])
                if self.pause:
                    self.stop.wait(self.pause)

    def __enter__(self) -> Users:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive()
