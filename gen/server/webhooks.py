"""Webhooks of video jobs: which target hosts the operator allows, the signed body, and the sender thread that
delivers what the job store owes (retried with exponential backoff, never on the queue's worker).

Signatures follow Standard Webhooks, as OpenAI's do: headers `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`; a secret `whsec_<base64>` is the decoded
bytes, any other string its UTF-8 bytes (so `openai.OpenAI().webhooks.unwrap(body, headers, secret=...)` verifies it).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import threading
import time
from urllib.parse import urlsplit

from gen.server.limits import OverLimit
from gen.types import GenError

log = logging.getLogger(__name__)
MAX_URL = 2048


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookPolicy:
    """The hosts webhook_url may name (`host` or `host:port`, as the operator lists them) and the signing secret.
    No hosts: webhooks are off and a webhook_url is refused."""

    def __init__(self, hosts: list[str] | tuple[str, ...] = (), secret: str | None = None):
        self.hosts = {h.lower() for h in hosts}
        if self.hosts and not secret:
            raise GenError("--webhook-allow-host needs --webhook-secret (or $GEN_WEBHOOK_SECRET) to sign the calls",
                           param="webhook_secret")
        if secret and secret.startswith("whsec_"):
            try:
                base64.b64decode(secret[6:], validate=True)
            except ValueError:
                raise GenError("--webhook-secret starting with 'whsec_' must continue in base64", param="webhook_secret"
                               ) from None
        self.secret = secret

    def check(self, url: str) -> str:
        """`url` if webhooks may call it, else OverLimit naming webhook_url (no server-side request forgery)."""
        if not self.hosts:
            raise OverLimit("webhooks are not enabled on this server (the operator allows none)", "webhook_url",
                            "webhooks_disabled")
        if len(url) > MAX_URL:
            raise OverLimit(f"webhook_url is longer than {MAX_URL} characters", "webhook_url", "invalid_value")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise OverLimit(f"webhook_url is not a valid URL ({e})", "webhook_url", "invalid_value") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OverLimit(f"webhook_url must be an http(s) URL with a host, got {url!r}", "webhook_url",
                            "invalid_value")
        if parts.username is not None or parts.password is not None:
            raise OverLimit("webhook_url may not carry credentials", "webhook_url", "invalid_value")
        host = parts.hostname.lower()
        if host not in self.hosts and (port is None or f"{host}:{port}" not in self.hosts):
            raise OverLimit(f"webhook_url's host {host!r} is not one this server may call", "webhook_url",
                            "webhook_host_not_allowed")
        return url


class WebhookSender:
    """A thread delivering the webhooks the store owes (from any replica): POST the signed body; a 2xx ends it,
    anything else is retried after backoff, 2 x backoff, 4 x backoff, ... up to `attempts` tries."""

    def __init__(self, store, policy: WebhookPolicy, *, backoff: float = 1.0, attempts: int = 6,
                 timeout: float = 10.0, poll: float = 0.5, metrics=None):
        import httpx

        self.store, self.policy, self.backoff, self.attempts = store, policy, backoff, attempts
        self.poll, self.metrics = poll, metrics
        self._client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gen-webhooks", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                hook = self.store.claim_webhook(hold=60.0)
            except Exception as e:  # the store is unreachable: try again later
                log.warning("could not read webhooks from the store: %s", e)
                hook = None
            if hook is None:
                self._stop.wait(self.poll)
                continue
            self._deliver(hook)

    def _deliver(self, hook: dict) -> None:
        try:
            self.policy.check(hook["url"])  # the operator may have changed the allowed hosts since
        except OverLimit as e:
            log.error("dropping webhook %s: %s", hook["id"], e)
            self.store.webhook_done(hook["id"])
            self._count("dropped")
            return
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": hook["id"],
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(self.policy.secret, hook["id"], timestamp, hook["body"])}
        try:
            answer = self._client.post(hook["url"], content=hook["body"].encode(), headers=headers)
            ok, why = 200 <= answer.status_code < 300, f"HTTP {answer.status_code}"
        except Exception as e:  # any transport failure is retried like a bad status
            ok, why = False, f"{type(e).__name__}: {e}"
        if ok:
            self.store.webhook_done(hook["id"])
            self._count("delivered")
        elif hook["attempts"] >= self.attempts:
            log.error("giving up on webhook %s to %s after %d attempts (%s)", hook["id"], hook["url"],
                      hook["attempts"], why)
            self.store.webhook_done(hook["id"])
            self._count("dropped")
        else:
            delay = self.backoff * 2 ** (hook["attempts"] - 1)
            log.warning("webhook %s to %s failed (%s); retrying in %.3g s", hook["id"], hook["url"], why, delay)
            self.store.webhook_retry(hook["id"], delay)
            self._count("retried")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.webhooks.labels(outcome).inc()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._client.close()
