"""Make the Prefect UI screenshots of docs/cluster.md (docs/figures/ui-*.png).

    .venv/bin/python docs/figures/ui_screenshots.py [--out docs/figures]

Starts `prefect server start` on 127.0.0.1 (its own PREFECT_HOME in a scratch folder), a
file server on 127.0.0.1 that shows the storage root (`storage.browse_url`), and three
smoke runs against them: `ui-demo` (finished), `ui-broken-corpus` (fails in fine-tuning
on a corpus file that is not JSON lines) and `ui-live` (400 steps, pictured while it
trains). Each page is loaded in headless Chromium (Debian's `chromium`) through the
DevTools protocol and saved as a PNG; the servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium; `shot` loads a page, optionally clicks a tab, saves a PNG."""

    def __init__(self, work: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={work / 'chromium'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(150):
            try:
                tabs = httpx.get(f"http://127.0.0.1:{self.port}/json").json()
                self.ws = next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"]
                return
            except (httpx.HTTPError, StopIteration):
                time.sleep(0.2)
        raise RuntimeError("chromium did not start")

    def shot(self, url: str, out: Path, *, width: int = 1600, height: int = 1000, click: str = "",
             clip_from: str = "", clip_height: int = 0, wait_s: float = 8.0) -> None:
        asyncio.run(self._shot(url, out, width, height, click, clip_from, clip_height, wait_s))
        print(f"wrote {out}")

    async def _shot(self, url, out, width, height, click, clip_from, clip_height, wait_s) -> None:
        import websockets

        async with websockets.connect(self.ws, max_size=None) as ws:
            n = 0

            async def call(method: str, **params):
                nonlocal n
                n += 1
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    m = json.loads(await ws.recv())
                    if m.get("id") == n:
                        if "error" in m:
                            raise RuntimeError(f"{method}: {m['error']}")
                        return m["result"]

            async def js(expr: str):
                r = await call("Runtime.evaluate", expression=expr, returnByValue=True)
                return r["result"].get("value")

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                       deviceScaleFactor=1, mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.sleep(wait_s)
            if click:
                found = await js(
                    "(() => { const e = [...document.querySelectorAll('button,a,[role=tab],li,span,div')]"
                    f".filter(e => e.textContent.trim() === {json.dumps(click)} && e.children.length <= 1);"
                    " if (!e.length) return 0; e[0].click(); return e.length; })()")
                if not found:
                    raise RuntimeError(f"{url}: nothing labelled {click!r} to click")
                await asyncio.sleep(wait_s / 2)
            params: dict = {"format": "png"}
            if clip_from:
                top = await js(
                    "(() => { const e = [...document.querySelectorAll('h1,h2,h3')]"
                    f".find(e => e.textContent.trim() === {json.dumps(clip_from)});"
                    " return e ? e.getBoundingClientRect().top + window.scrollY : null; })()")
                if top is None:
                    raise RuntimeError(f"{url}: no heading {clip_from!r}")
                params.update(captureBeyondViewport=True,
                              clip={"x": 0, "y": max(0, top - 20), "width": width,
                                    "height": clip_height, "scale": 1})
            out.write_bytes(base64.b64decode((await call("Page.captureScreenshot", **params))["data"]))

    def close(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plasticity-ui-"))
    api_port, files_port = _free_port(), _free_port()
    ui = f"http://127.0.0.1:{api_port}"
    api = f"{ui}/api"
    store = work / "store"
    store.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
                         env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
                         start_new_session=True),
        subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(store),
                          str(files_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True),
    ]
    browser = None
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{api}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"prefect server did not start; see {work / 'server.log'}")

        def run(run_id: str, *sets: str, wait: bool = True):
            cmd = [str(BIN / "plasticity"), "run", "--config", "configs/smoke.yaml", "--storage", f"file://{store}",
                   "--run-id", run_id, "--set", f"storage.browse_url=http://127.0.0.1:{files_port}/"]
            for s in sets:
                cmd += ["--set", s]
            log = open(work / f"{run_id}.log", "wb")
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            if wait:
                p.wait()
                print(f"run {run_id}: exit {p.returncode}")
            return p

        def find(kind: str, body: dict) -> list[dict]:
            return httpx.post(f"{api}/{kind}/filter", json=body).json()

        def flow_run(run_id: str) -> dict:
            return find("flow_runs", {"flow_runs": {"name": {"any_": [f"timeline {run_id}"]}}})[0]

        def finetune(fr: dict) -> dict:
            return next(t for t in find("task_runs", {"flow_runs": {"id": {"any_": [fr["id"]]}}})
                        if t["name"].startswith("finetune"))

        def artifact(key: str) -> dict:
            return find("artifacts", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})[0]

        run("ui-demo")
        bad = work / "corpus.jsonl"
        bad.write_text("this is not json\n")
        run("ui-broken-corpus", f"data.corpus={bad}")
        browser = Browser(work)
        live = run("ui-live", "train.max_steps=400", "train.snapshot_steps=[0, 200, 400]", "train.log_every=5",
                   wait=False)
        for _ in range(300):
            time.sleep(1)
            try:
                if "left" in (artifact("finetune-progress-ui-live")["description"] or ""):
                    break
            except (IndexError, KeyError):
                pass
        time.sleep(5)
        prog = artifact("finetune-progress-ui-live")
        browser.shot(f"{ui}/artifacts/artifact/{prog['id']}", args.out / "ui-progress-artifact.png", height=240)
        browser.shot(f"{ui}/runs/task-run/{finetune(flow_run('ui-live'))['id']}", args.out / "ui-task-run-logs.png",
                     width=1200, height=750)
        live.wait()
        demo = flow_run("ui-demo")
        browser.shot(f"{ui}/runs/flow-run/{demo['id']}", args.out / "ui-artifacts-tab.png", width=1400,
                     height=1500, click="Artifacts")
        summary = artifact("plasticity-summary-ui-demo")
        browser.shot(f"{ui}/artifacts/artifact/{summary['id']}", args.out / "ui-summary-artifact.png",
                     width=1200, height=1000)
        browser.shot(f"{ui}/artifacts/artifact/{summary['id']}", args.out / "ui-summary-storage.png",
                     width=1200, height=9000, clip_from="In storage", clip_height=1500)
        browser.shot(f"{ui}/runs/task-run/{finetune(flow_run('ui-broken-corpus'))['id']}",
                     args.out / "ui-failed-task-logs.png", width=1200, height=1100)
    finally:
        if browser is not None:
            browser.close()
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
    print(f"scratch folder (runs, logs): {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
