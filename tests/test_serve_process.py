"""`kvsqueeze serve` as a process: killed with SIGKILL in the middle of storing a context, then started again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai

from serving import DOCUMENT, free_port, served_model, tokenizer

# Runs the command with the store's digest step (after the context's file is written, before it is renamed into
# place and indexed) stopping for good on the second context, and saying so in a file.
LAUNCHER = """
import os, sys, time
from kvsqueeze import cli
from kvsqueeze.serve import store

real, calls = store.digest, []

def digest(path, sync=False):
    result = real(path, sync)
    if sync:
        calls.append(path)
        if len(calls) == 2:
            open(os.environ["MARKER"], "w").write(str(path))
            time.sleep(3600)
    return result

store.digest = digest
sys.exit(cli.main(sys.argv[1:]))
"""


def start(command: list[str], port: int, log, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)


def test_killed_during_an_upload_then_restarted(tmp_path):
    model_dir, store, marker = tmp_path / "model", tmp_path / "store", tmp_path / "marker"
    served_model().save_pretrained(model_dir)
    tokenizer().save_pretrained(model_dir)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    arguments = ["serve", "--model", str(model_dir), "--store", str(store), "--method", "snapkv", "--log-level",
                 "warning"]
    port = free_port()
    first, url = start([sys.executable, str(tmp_path / "launcher.py"), *arguments, "--port", str(port)], port,
                       tmp_path / "first.log", os.environ | {"MARKER": str(marker)})
    try:
        kept = httpx.post(url + "/v1/contexts", json={"text": DOCUMENT[:1200]}, timeout=120).json()["id"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        question = {"model": str(model_dir), "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 8,
                    "extra_body": {"context_id": kept}}
        before = client.chat.completions.create(**question).choices[0].message.content

        def upload_then_lose_the_server():
            try:
                httpx.post(url + "/v1/contexts", json={"text": DOCUMENT[1200:2400]}, timeout=120)
            except httpx.TransportError:
                pass  # killed before it answered

        upload = threading.Thread(target=upload_then_lose_the_server, daemon=True)
        upload.start()
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, "the second upload never reached the store"
            time.sleep(0.05)
        partial = [p.name for p in (store / "contexts").iterdir() if p.name.endswith(".partial")]
        assert len(partial) == 1  # its file is written, not yet renamed nor indexed
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        first.kill()
        first.wait()
    # a crash between the rename and the index row leaves a whole file that nothing lists
    orphan = store / "contexts" / ("ctx-" + "ab" * 16 + ".safetensors")
    shutil.copy(store / "contexts" / f"{kept}.safetensors", orphan)

    port = free_port()
    second, url = start([sys.executable, "-m", "kvsqueeze.cli", *arguments, "--port", str(port)], port,
                        tmp_path / "second.log")
    try:
        listed = httpx.get(url + "/v1/contexts").json()["data"]
        assert [c["id"] for c in listed] == [kept]
        assert sorted(p.name for p in (store / "contexts").iterdir()) == [f"{kept}.safetensors"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert client.chat.completions.create(**question).choices[0].message.content == before
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends with the signal, after a graceful shutdown
