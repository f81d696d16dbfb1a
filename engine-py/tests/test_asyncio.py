"""The asyncio variants: same outputs, the event loop never blocked, cancellation aborts."""

import asyncio

from conftest import wait_for_idle
from llmd import SamplingParams

PROMPTS = ["Once upon a time", "The little dog", "One day"]


def test_generate_async_equals_generate(stories):
    p = SamplingParams(temperature=0.8, seed=2, max_tokens=30)
    sync = stories.generate(PROMPTS, p, use_tqdm=False)
    outs = asyncio.run(stories.generate_async(PROMPTS, p))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in sync]
    assert [o.prompt for o in outs] == PROMPTS


def test_stream_async_deltas_and_concurrent_streams(stories):
    p = SamplingParams(temperature=0.8, seed=4, max_tokens=30)
    sync = stories.generate(PROMPTS, p, use_tqdm=False)

    async def one(prompt):
        ids, text = [], ""
        async for d in stories.stream_async(prompt, p):
            ids += d.outputs[0].token_ids
            text += d.outputs[0].text
        return ids, text

    async def main():
        return await asyncio.gather(*(one(q) for q in PROMPTS * 4))

    got = asyncio.run(main())
    want = [(o.outputs[0].token_ids, o.outputs[0].text) for o in sync] * 4
    assert got == want


def test_the_event_loop_keeps_running_while_waiting(stories):
    p = SamplingParams(max_tokens=300, ignore_eos=True)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        await stories.generate_async(["Once upon a time"] * 32, p)
        stop.set()
        await t
        return ticks

    assert asyncio.run(main()) > 10


def test_cancelling_aborts_the_requests(stories):
    p = SamplingParams(max_tokens=480, ignore_eos=True)

    async def main():
        task = asyncio.create_task(stories.generate_async(["Once upon a time"] * 256, p))
        await asyncio.sleep(0.2)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())
    s = wait_for_idle(stories)
    assert s["num_free_blocks"] == s["num_total_blocks"]

    async def leave_stream():
        async with stories.stream_async("Once upon a time", p) as s:
            async for _ in s:
                break

    asyncio.run(leave_stream())
    s = wait_for_idle(stories)
    assert s["num_free_blocks"] == s["num_total_blocks"]
