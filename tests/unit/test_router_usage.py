"""Reading ``usage`` and the first generated text from answers as they pass the router."""

import time

from gpufleet.router.metrics import StreamNotes, usage_of


class FakeExchange:
    def __init__(self):
        self.started = time.perf_counter()
        self.ttft = None
        self.usage = None


def test_usage_of_plain_answers_in_any_key_order():
    body = (b'{"id":"x","choices":[{"message":{"content":"hi"}}],'
            b'"usage":{"completion_tokens":7,"prompt_tokens":12,"total_tokens":19}}')
    assert usage_of(body) == (12, 7)
    assert usage_of(b'{"choices":[],"usage":null}') is None
    assert usage_of(b'{"choices":[]}') is None


def test_stream_notes_first_text_and_a_usage_chunk_split_in_two():
    ex = FakeExchange()
    notes = StreamNotes(ex)
    notes.note(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    assert ex.ttft is None  # vLLM's first delta carries no text
    notes.note(b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n')
    assert ex.ttft is not None
    first = ex.ttft
    notes.note(b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n')
    assert ex.ttft == first
    notes.note(b'data: {"choices":[],"usage":{"prompt_tokens":5,"total_tokens":')
    notes.note(b'8,"completion_tokens":3}}\n\ndata: [DONE]\n\n')
    assert ex.usage == (5, 3)


def test_stream_notes_completions_text():
    ex = FakeExchange()
    StreamNotes(ex).note(b'data: {"choices":[{"text":" once","index":0}]}\n\n')
    assert ex.ttft is not None and ex.usage is None
