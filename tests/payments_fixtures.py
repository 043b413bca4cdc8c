"""Fixtures of the payment tests (issue 12): one ``localstripe --from-scratch`` per test
session on a free port (it keeps its store in one fixed file, /tmp/localstripe.pickle,
shared by every instance, so each instance must start from scratch and never read it), and
a small fault-injecting HTTP proxy of ours in front of it, started per test in the test's
own event loop: it fails (500), drops (closes the connection without answering), delays,
or forwards and then loses the answer, on the calls a test chooses, and logs every call."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web

from engine.payments.provider import StripeProvider

API_KEY = "sk_test_slotguard"
WEBHOOK_SECRET = "whsec_test_slotguard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def localstripe_url():
    exe = shutil.which("localstripe", path=os.path.dirname(sys.executable)) \
        or shutil.which("localstripe")
    assert exe, "localstripe is a test dependency (pip install -e '.[test]')"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sg-localstripe-")
    proc = subprocess.Popen([exe, "--port", str(port), "--from-scratch"], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/v1/customers", auth=(API_KEY, ""), timeout=2)
            break
        except httpx.HTTPError:
            assert proc.poll() is None, "localstripe exited"
            assert time.monotonic() < deadline, "localstripe did not start"
            time.sleep(0.2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Rule:
    """What to do with matching calls: ``action`` is fail (answer 500), drop (close without
    an answer), delay (wait ``seconds`` then forward), lose (forward, then close without
    passing the answer on) or hold (forward only once ``release`` is set); ``times`` calls
    (None: all). ``hold`` never forwards; ``hold_answer`` forwards and then keeps the answer
    until ``release``."""

    method: str
    path: str  # a regular expression, matched against the path
    action: str
    times: int | None = 1
    seconds: float = 0.0
    status: int = 500  # of fail: 402 answers a card error (card_declined)
    release: asyncio.Event | None = None
    seen: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Call:
    method: str
    path: str
    status: int | None  # None: no answer passed on
    action: str  # forwarded | fail | drop | lose | ...
    account: str | None = None  # the Stripe-Account header
    idempotency_key: str | None = None


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[Rule] = []
        self.calls: list[Call] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._client = httpx.AsyncClient(timeout=60)

    def add(self, method: str, path: str, action: str, **kw) -> Rule:
        rule = Rule(method, path, action, **kw)
        self.rules.append(rule)
        return rule

    def forwarded(self, method: str, path: str) -> list[Call]:
        """Calls that reached localstripe (forwarded, lost or held ones)."""
        return [c for c in self.calls if c.method == method and re.fullmatch(path, c.path)
                and c.action in ("forwarded", "lose", "delay", "hold_answer")]

    def _rule_for(self, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.method == method and re.fullmatch(rule.path, path) \
                    and (rule.times is None or rule.times > 0):
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rule = self._rule_for(request.method, request.path)
        extra = {"account": request.headers.get("Stripe-Account"),
                 "idempotency_key": request.headers.get("Idempotency-Key")}
        action = rule.action if rule else "forwarded"
        if rule is not None:
            rule.seen.set()
        if action == "fail":
            self.calls.append(Call(request.method, request.path, rule.status, action, **extra))
            if rule.status == 402:
                return web.json_response({"error": {
                    "type": "card_error", "code": "card_declined",
                    "message": "Your card was declined (injected)."}}, status=402)
            return web.json_response({"error": {"type": "api_error",
                                                "message": "injected failure"}},
                                     status=rule.status)
        if action == "drop":
            self.calls.append(Call(request.method, request.path, None, action, **extra))
            request.transport.close()
            raise ConnectionResetError("dropped")
        if action == "delay":
            await asyncio.sleep(rule.seconds)
        if action == "hold":  # never forwarded: the caller dies waiting
            self.calls.append(Call(request.method, request.path, None, action, **extra))
            await rule.release.wait()
            request.transport.close()
            raise ConnectionResetError("held, then dropped")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        answer = await self._client.request(request.method, self.upstream + request.path_qs,
                                            content=body, headers=headers)
        if action in ("lose", "hold_answer"):
            self.calls.append(Call(request.method, request.path, None, action, **extra))
            if action == "hold_answer":  # forwarded; the answer waits for the caller's death
                await rule.release.wait()
            request.transport.close()
            raise ConnectionResetError("answer lost")
        self.calls.append(Call(request.method, request.path, answer.status_code, action,
                               **extra))
        return web.Response(body=answer.content, status=answer.status_code,
                            content_type="application/json")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for rule in self.rules:
            if rule.release is not None:
                rule.release.set()
        await self._client.aclose()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def stripe_proxy(localstripe_url):
    proxy = FaultProxy(localstripe_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def provider(stripe_proxy):
    p = StripeProvider(API_KEY, api_base=stripe_proxy.url, webhook_secret=WEBHOOK_SECRET)
    yield p
    await p.close()


async def card_method(localstripe_url: str, number: str) -> str:
    """A card PaymentMethod on localstripe (e.g. 4000002760003184: 3-D Secure required)."""
    async with httpx.AsyncClient(auth=(API_KEY, "")) as c:
        r = await c.post(localstripe_url + "/v1/payment_methods",
                         data={"type": "card", "card[number]": number, "card[exp_month]": "12",
                               "card[exp_year]": "2034", "card[cvc]": "123"})
        r.raise_for_status()
        return r.json()["id"]


async def authenticate_3ds(localstripe_url: str, intent_id: str, success: bool = True) -> dict:
    """Complete (or fail) a requires_action intent's 3-D Secure on localstripe."""
    async with httpx.AsyncClient(auth=(API_KEY, "")) as c:
        intent = (await c.get(f"{localstripe_url}/v1/payment_intents/{intent_id}")).json()
        r = await c.post(f"{localstripe_url}/v1/payment_intents/{intent_id}/_authenticate",
                         data={"client_secret": intent["client_secret"],
                               "success": "true" if success else "false"})
        r.raise_for_status()
        return r.json()


async def stripe_intent(localstripe_url: str, intent_id: str) -> dict:
    async with httpx.AsyncClient(auth=(API_KEY, "")) as c:
        r = await c.get(f"{localstripe_url}/v1/payment_intents/{intent_id}")
        r.raise_for_status()
        return r.json()
