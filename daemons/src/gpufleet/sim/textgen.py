"""Deterministic text: a rough tokenizer, a seeded token stream and stop-string handling.

Nothing here touches a socket or a clock, so every piece is unit-testable.
"""

from __future__ import annotations

import functools
import hashlib
import re

# Roughly what a BPE tokenizer does to English: short words are one token, long words a
# few, punctuation its own. Close enough for usage counts and the prefill latency model.
_TOKEN_RE = re.compile(r"\w{1,6}|[^\w\s]")

# Extra tokens a chat template adds per message and to open the assistant's turn.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_FOR_REPLY = 3

_WORDS = (
    "the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by", "from",
    "this", "be", "are", "or", "an", "have", "not", "but", "they", "which", "one", "you", "were", "all", "we",
    "her", "she", "there", "would", "their", "will", "each", "about", "how", "up", "out", "them", "then", "many",
    "some", "so", "these", "other", "into", "has", "more", "two", "time", "like", "could", "no", "see", "way",
    "only", "its", "now", "my", "over", "did", "down", "after", "first", "also", "new", "any", "where", "just",
    "most", "through", "long", "good", "little", "very", "well", "still", "own", "men", "work", "life", "should",
    "because", "great", "being", "under", "never", "same", "another", "while", "last", "might", "us", "old",
    "know", "around", "high", "every", "small", "between", "model", "token", "batch", "cache", "memory", "queue",
    "request", "latency", "stream", "router", "worker", "fleet", "server", "signal", "vector", "tensor", "kernel",
    "prompt", "answer", "system", "value", "engine", "window", "layer", "weight", "compute", "network", "order",
    "simple", "quiet", "bright", "river", "stone", "cloud", "light", "green", "field", "garden", "morning",
    "evening", "winter", "summer", "market", "harbour", "engineer", "student", "teacher", "journey", "story"
)


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def tokenize(text: str) -> list[str]:
    """The prompt's tokens, as strings: the same text gives the same tokens in every process
    (no salted ``hash()``), which is what makes prefix-cache block hashes agree across workers."""
    return _TOKEN_RE.findall(text)


def content_text(content) -> str:
    """The text of a chat message's ``content``: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return str(content)


def chat_prompt_tokens(messages: list[dict]) -> int:
    total = CHAT_TOKENS_FOR_REPLY
    for message in messages:
        total += CHAT_TOKENS_PER_MESSAGE + count_tokens(content_text(message.get("content")))
    return total


@functools.lru_cache(maxsize=4096)
def _content_tokens(text: str) -> tuple[str, ...]:
    """A message's tokens, remembered: a shared system prompt or a re-sent history is
    tokenised once per process, not once per request."""
    return tuple(_TOKEN_RE.findall(text))


# A stable id per token string, the same in every process (a vocabulary, as a real
# tokenizer has): what /v1/chat/completions/render answers.
VOCAB_SIZE = 128_256  # Llama 3's
_IDS: dict[str, int] = {}


def token_ids(tokens: list[str]) -> list[int]:
    ids = _IDS
    if len(ids) > 1_000_000:  # unique numbers and names must not grow it without bound
        ids.clear()
    out = []
    for token in tokens:
        found = ids.get(token)
        if found is None:
            digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            found = ids[token] = int.from_bytes(digest, "big") % VOCAB_SIZE
        out.append(found)
    return out


def chat_template_tokens(messages: list[dict]) -> list[str]:
    """The prompt after a Llama-like chat template, tokenised: per message ``<|start|> role
    <|sep|> content… <|end|>`` (CHAT_TOKENS_PER_MESSAGE), then ``<|start|> assistant <|sep|>``
    to open the reply (CHAT_TOKENS_FOR_REPLY). A conversation that re-sends its history
    therefore starts with the same tokens as its previous turn, as with a real template."""
    tokens: list[str] = []
    for message in messages:
        tokens += ("<|start|>", str(message.get("role")), "<|sep|>")
        tokens += _content_tokens(content_text(message.get("content")))
        tokens.append("<|end|>")
    tokens += ("<|start|>", "assistant", "<|sep|>")
    return tokens


def seed_for(prompt_key: str, seed: int) -> bytes:
    """The seed material of a text: same prompt + seed -> same text."""
    return hashlib.blake2b(f"{seed}\x00{prompt_key}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class TokenStream:
    """Sentences of plausible words, one token at a time, and a natural length (where the
    model would emit its end-of-sequence token).

    The randomness is a hash chain (BLAKE2b of the seed and a block counter), which costs a
    microsecond per 32 tokens, where seeding a Mersenne Twister per request costs several."""

    __slots__ = ("_seed", "_block", "_buffer", "_pos", "_index", "_sentence_left", "natural_length")

    def __init__(self, seed: bytes | int, natural_range: tuple[int, int] = (32, 512)):
        self._seed = seed if isinstance(seed, bytes) else int(seed).to_bytes(16, "big", signed=True)
        self._block = 0
        self._buffer = b""
        self._pos = 0
        low, high = natural_range
        self.natural_length = low + self._draw() % (high - low + 1)
        self._index = 0
        self._sentence_left = 0

    def _draw(self) -> int:
        """The next 16 random bits."""
        if self._pos >= len(self._buffer):
            self._buffer = hashlib.blake2b(self._seed + self._block.to_bytes(4, "big"), digest_size=64).digest()
            self._block += 1
            self._pos = 0
        pos = self._pos
        self._pos = pos + 2
        return self._buffer[pos] << 8 | self._buffer[pos + 1]

    def next_token(self) -> str:
        if self._sentence_left == 0 and self._index > 0:
            self._sentence_left = -1
            self._index += 1
            return "."
        word = _WORDS[self._draw() % len(_WORDS)]
        if self._sentence_left <= 0:
            self._sentence_left = 4 + self._draw() % 10
            word = word.capitalize()
        self._sentence_left -= 1
        token = word if self._index == 0 else " " + word
        self._index += 1
        return token

    def take(self, count: int) -> list[str]:
        return [self.next_token() for _ in range(count)]


class StopChecker:
    """Finds stop strings in the text generated so far, like vLLM's detokenizer: the
    output ends just before the first stop string, and while streaming, text that could
    be the start of a stop string is held back until it is known not to be."""

    __slots__ = ("_stops", "_hold", "_text", "_sent")

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._sent = 0

    @property
    def text(self) -> str:
        return self._text

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add a token's text; return (text safe to send now, the stop string hit or None)."""
        start = max(0, len(self._text) - self._hold)
        self._text += piece
        if self._stops:
            hit_at, hit = -1, None
            for stop in self._stops:
                at = self._text.find(stop, start)
                if at >= 0 and (hit_at < 0 or at < hit_at):
                    hit_at, hit = at, stop
            if hit is not None:
                self._text = self._text[:hit_at]
                return self.flush(), hit
        safe = len(self._text) - self._hold
        if safe > self._sent:
            out = self._text[self._sent:safe]
            self._sent = safe
            return out, None
        return "", None

    def flush(self) -> str:
        out = self._text[self._sent:]
        self._sent = len(self._text)
        return out
