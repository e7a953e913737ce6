"""Headless Chromium driven over the DevTools protocol, on the reactor.

Chromium runs with ``--remote-debugging-pipe``: it reads commands from its fd 3 and
writes replies and events to its fd 4, each a JSON message ended by a NUL byte, so
no port, no websocket and no extra package are needed.  Every command has a
timeout; waits for the page happen inside the page (a MutationObserver with a
deadline), so a test never sleeps.
"""

import base64
import json
import shutil

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.protocol import ProcessProtocol

TIMEOUT = 20.0
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--remote-debugging-pipe", "--window-size=1200,500",
)
_COMMANDS_FD, _REPLIES_FD = 3, 4

# Resolves with COND's value once it is truthy (checked now and after each change of
# the document), rejects after MS milliseconds.
_WAIT = """new Promise((resolve, reject) => {
  const check = () => { try { return (COND); } catch (e) { return false; } };
  const done = (value) => { observer.disconnect(); clearTimeout(timer); resolve(value); };
  const observer = new MutationObserver(() => { const v = check(); if (v) done(v); });
  const timer = setTimeout(() => { observer.disconnect();
    reject(new Error("not true within MS ms: " + DESCRIPTION)); }, MS);
  observer.observe(document, {subtree: true, childList: true, characterData: true,
                              attributes: true});
  const now = check(); if (now) done(now);
})"""


class DevToolsError(Exception):
    pass


class Chromium(ProcessProtocol):
    """One headless browser with one page; ``start()`` then ``navigate()``, ``wait_for()``."""

    def __init__(self, reactor, user_data_dir):
        self.reactor = reactor
        self.user_data_dir = str(user_data_dir)
        self._buffer = b""
        self._next_id = 0
        self._pending = {}
        self._ended = False
        self._end_waiters = []
        self.session_id = None
        self.stderr = b""
        self._event_waiters = {}  # event method -> [Deferred], fired by its next event

    async def start(self):
        executable = shutil.which("chromium")
        assert executable, "Debian's chromium is not installed (.ci/run installs it)"
        argv = [executable, *FLAGS, f"--user-data-dir={self.user_data_dir}", "about:blank"]
        self.reactor.spawnProcess(
            self, executable, argv, env=None,
            childFDs={0: "w", 1: "r", 2: "r", _COMMANDS_FD: "w", _REPLIES_FD: "r"})
        targets = await self.send("Target.getTargets")
        page = next(t for t in targets["targetInfos"] if t["type"] == "page")
        attached = await self.send("Target.attachToTarget", targetId=page["targetId"],
                                   flatten=True)
        self.session_id = attached["sessionId"]
        await self.send("Page.enable")

    # The pipe

    def childDataReceived(self, fd, data):
        if fd == 2:
            self.stderr = (self.stderr + data)[-4096:]
        if fd != _REPLIES_FD:
            return
        self._buffer += data
        *messages, self._buffer = self._buffer.split(b"\0")
        for message in messages:
            reply = json.loads(message)
            if "id" not in reply:
                for waiter in self._event_waiters.pop(reply.get("method"), ()):
                    if not waiter.called:
                        waiter.callback(reply.get("params", {}))
                continue
            waiting = self._pending.pop(reply["id"], None)
            if waiting is None:
                continue  # timed out already
            if "error" in reply:
                waiting.errback(DevToolsError(reply["error"].get("message")))
            else:
                waiting.callback(reply.get("result", {}))

    def processEnded(self, reason):
        for waiting in self._pending.values():
            waiting.errback(DevToolsError(f"chromium ended: {self.stderr[-500:]!r}"))
        self._pending.clear()
        self._ended = True
        for waiter in self._end_waiters:
            if not waiter.called:  # a timed-out wait is done already
                waiter.callback(None)

    def _when_ended(self, timeout):
        waiter = Deferred()
        if self._ended:
            waiter.callback(None)
        else:
            self._end_waiters.append(waiter)
        return waiter.addTimeout(timeout, self.reactor)

    def send(self, method, timeout=TIMEOUT, **params):
        """A Deferred of the command's result (in the page's session once attached)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session_id is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session_id
        result = Deferred()
        self._pending[self._next_id] = result
        self.transport.writeToChild(_COMMANDS_FD, json.dumps(message).encode() + b"\0")
        return result.addTimeout(timeout, self.reactor)

    # The page

    def next_event(self, method, timeout=TIMEOUT):
        """A Deferred of the params of the next ``method`` event."""
        waiter = Deferred()
        self._event_waiters.setdefault(method, []).append(waiter)
        return waiter.addTimeout(timeout, self.reactor)

    async def navigate(self, url):
        loaded = self.next_event("Page.loadEventFired")
        reply = await self.send("Page.navigate", url=url)
        if reply.get("errorText"):
            raise DevToolsError(f"cannot load {url}: {reply['errorText']}")
        await loaded

    async def evaluate(self, expression, timeout=TIMEOUT, promise=False):
        reply = await self.send("Runtime.evaluate", timeout, expression=expression,
                                returnByValue=True, awaitPromise=promise)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(text)
        return reply["result"].get("value")

    def wait_for(self, condition, description, timeout=TIMEOUT):
        """The value of JS ``condition`` once truthy; DevToolsError after ``timeout`` s."""
        expression = (_WAIT.replace("COND", condition)
                      .replace("MS", str(int(timeout * 1000)))
                      .replace("DESCRIPTION", json.dumps(description)))
        return self.evaluate(expression, timeout=timeout + 5, promise=True)

    async def screenshot(self):
        reply = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(reply["data"])

    async def stop(self):
        """Close the browser; kill it if it does not end within 10 s."""
        if self.transport is None or self._ended:
            return
        self.send("Browser.close", timeout=10).addErrback(lambda _: None)  # it may not reply
        try:
            await self._when_ended(10)
        except TimeoutError:
            self.transport.signalProcess("KILL")
            await self._when_ended(TIMEOUT)
