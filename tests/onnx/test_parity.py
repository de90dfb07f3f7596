"""Greedy tokens from the ONNX decoder equal transformers' on the same weights."""

from __future__ import annotations

import threading

from tests.onnx.helpers import PROMPTS, chat, hf_greedy

N = 40


def test_greedy_batch1_matches_transformers(llama_rt, llama_torch):
    for text in PROMPTS:
        ids = chat(llama_rt, text)
        ours = llama_rt.generate_ids(ids, N).token_ids
        ref = hf_greedy(llama_torch, ids, N, llama_rt.layout.eos_ids)
        assert ours == ref
        assert len(set(ours)) > 5  # the random model does not collapse into one token


def test_padded_batch_matches_transformers(llama_rt, llama_torch):
    """Prompts of different lengths admitted together (one padded prefill) and stepped."""
    ids = [chat(llama_rt, t) for t in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    jobs = [llama_rt.submit_ids(i, max_new_tokens=N) for i in ids]
    for i, job in zip(ids, jobs, strict=True):
        assert job.future.result().token_ids == hf_greedy(
            llama_torch, i, N, llama_rt.layout.eos_ids
        )


def test_jobs_joining_and_leaving_get_their_solo_tokens(llama_rt):
    """A job joins a running batch mid-way; short jobs leave while others go on."""
    ids = [chat(llama_rt, t) for t in PROMPTS]
    lengths = [60, 7, 25]
    solo = [
        llama_rt.generate_ids(i, n, ignore_eos=True).token_ids
        for i, n in zip(ids, lengths, strict=True)
    ]
    joined: list = []
    started = threading.Event()

    def on_token(_piece: str) -> None:
        if not started.is_set() and len(first.generated) >= 10:
            started.set()  # called on the engine thread: these join at the next step
            joined.extend(
                llama_rt.submit_ids(i, max_new_tokens=n, ignore_eos=True)
                for i, n in zip(ids[1:], lengths[1:], strict=True)
            )

    first = llama_rt.submit_ids(ids[0], max_new_tokens=lengths[0], ignore_eos=True,
                                on_token=on_token)
    assert first.future.result().token_ids == solo[0]
    assert [j.future.result().token_ids for j in joined] == solo[1:]
    # and a fresh job after all that reuses the freed rows correctly
    assert llama_rt.generate_ids(ids[2], 25, ignore_eos=True).token_ids == solo[2]
