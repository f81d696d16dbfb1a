"""Ctrl-C: a real SIGINT interrupts a long generate (and a stream) within the signal poll,
raises KeyboardInterrupt, and every request of the call is aborted, its KV blocks freed. And
the GIL is released while the engine works."""

import json
import subprocess
import sys
import textwrap
import threading
import time

from llmd import SamplingParams

# Runs in a child process, so a signal that came too late cannot hit pytest itself.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from llmd import LLM, SamplingParams

    llm = LLM(sys.argv[1], device="cpu", kv_cache_memory_gb=0.25)
    total = llm.stats()["num_total_blocks"]
    long = SamplingParams(max_tokens=480, ignore_eos=True)

    def interrupted(call):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            call()
        except KeyboardInterrupt:
            raised = time.monotonic() - start
            deadline = time.monotonic() + 10
            while llm.stats()["num_free_blocks"] != total and time.monotonic() < deadline:
                time.sleep(0.01)
            s = llm.stats()
            return {"interrupted": True, "after_s": raised, "free": s["num_free_blocks"],
                    "total": total, "running": s["num_running"], "waiting": s["num_waiting"]}
        return {"interrupted": False, "after_s": time.monotonic() - start}

    def gen():
        llm.generate(["Once upon a time"] * 256, long, use_tqdm=False)

    results = {"generate": interrupted(gen)}
    # The engine still works after an interrupt.
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=5), use_tqdm=False)
    results["after"] = len(out[0].outputs[0].token_ids)

    # A stream waiting for a delta that is slow to come: the engine's third step stalls 2 s.
    del llm
    llm = LLM._with_faults(sys.argv[1], "stall@3:2000", device="cpu", kv_cache_memory_gb=0.25)
    total = llm.stats()["num_total_blocks"]

    def stream():
        for _ in llm.stream("Once upon a time", long):
            pass

    results["stream"] = interrupted(stream)
    print(json.dumps(results))
    """
)


def test_sigint_interrupts_generate_and_stream_and_frees_their_requests(stories_dir):
    r = subprocess.run(
        [sys.executable, "-c", CHILD, stories_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    g = res["generate"]
    assert g["interrupted"], g
    # Raised within the signal poll (50 ms) of the signal, give or take a loaded machine.
    assert g["after_s"] < 2.0, g
    assert g["free"] == g["total"] and g["running"] == 0 and g["waiting"] == 0, g
    assert res["after"] == 5
    st = res["stream"]
    assert st["interrupted"], st
    assert st["after_s"] < 2.0, st
    assert st["free"] == st["total"] and st["running"] == 0, st


def test_gil_is_released_while_generating(stories):
    counter = 0
    stop = threading.Event()

    def spin():
        nonlocal counter
        while not stop.is_set():
            counter += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    before = counter
    stories.generate(["Once upon a time"] * 32, SamplingParams(max_tokens=200, ignore_eos=True),
                     use_tqdm=False)
    during = counter - before
    stop.set()
    t.join()
    # A thread that never got the GIL would not count at all.
    assert during > 10_000
