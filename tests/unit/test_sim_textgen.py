"""The simulator's text: token counts, deterministic streams, stop strings."""

from gpufleet.sim import textgen


def test_count_tokens_splits_words_long_words_and_punctuation():
    assert textgen.count_tokens("") == 0
    assert textgen.count_tokens("hello world") == 2
    assert textgen.count_tokens("Hello, world!") == 4
    # long words cost several tokens, like BPE
    assert textgen.count_tokens("internationalisation") == 4


def test_chat_prompt_tokens_count_template_overhead_and_parts():
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    expected = textgen.CHAT_TOKENS_FOR_REPLY + 2 * textgen.CHAT_TOKENS_PER_MESSAGE + 2 + 2
    assert textgen.chat_prompt_tokens(messages) == expected


def test_same_prompt_and_seed_give_same_tokens_and_others_differ():
    def text(prompt, seed):
        return "".join(textgen.TokenStream(textgen.seed_for(prompt, seed)).take(40))

    assert text("a prompt", 1) == text("a prompt", 1)
    assert text("a prompt", 1) != text("a prompt", 2)
    assert text("a prompt", 1) != text("another prompt", 1)


def test_token_stream_reads_like_sentences():
    tokens = textgen.TokenStream(textgen.seed_for("x", 0)).take(60)
    assert tokens[0][0].isupper() and not tokens[0].startswith(" ")
    assert all(t.startswith(" ") or t == "." for t in tokens[1:])
    assert "." in tokens
    after_period = tokens[tokens.index(".") + 1]
    assert after_period[1].isupper()


def test_natural_length_within_range():
    lengths = {textgen.TokenStream(seed, (5, 9)).natural_length for seed in range(200)}
    assert lengths == {5, 6, 7, 8, 9}


def test_stop_checker_truncates_before_first_stop_string():
    checker = textgen.StopChecker(["world", "xyz"])
    sent = []
    for piece in ["Hello", " big", " world", " again"]:
        out, hit = checker.feed(piece)
        sent.append(out)
        if hit:
            break
    assert hit == "world"
    assert "".join(sent) == "Hello big "
    assert checker.text == "Hello big "


def test_stop_checker_picks_the_earliest_of_several_stops():
    checker = textgen.StopChecker(["c", "b"])
    out, hit = checker.feed("abc")
    assert (out, hit, checker.text) == ("a", "b", "a")


def test_stop_checker_holds_back_a_possible_stop_prefix_while_streaming():
    checker = textgen.StopChecker(["END"])
    # the last len("END") - 1 characters could start "END": they wait
    assert checker.feed("abc E") == ("abc", None)
    assert checker.feed("N") == (" ", None)
    out, hit = checker.feed("X")                     # "ENX": not a stop after all
    assert (out, hit) == ("E", None)
    assert checker.flush() == "NX"


def test_stop_spanning_tokens_is_found():
    checker = textgen.StopChecker(["lo wo"])
    out1, _ = checker.feed("hel")
    out2, hit = checker.feed("lo world")
    assert hit == "lo wo"
    assert out1 + out2 == "hel"


def test_no_stops_passes_text_through():
    checker = textgen.StopChecker([])
    assert checker.feed("abc") == ("abc", None)
    assert checker.flush() == ""


def test_chat_template_tokens_count_like_chat_prompt_tokens_and_share_history():
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "more"}]
    first, second = textgen.chat_template_tokens(turn1), textgen.chat_template_tokens(turn2)
    assert len(first) == textgen.chat_prompt_tokens(turn1) and len(second) == textgen.chat_prompt_tokens(turn2)
    # the next turn re-sends the history: its tokens start with the previous turn's messages
    history = len(first) - textgen.CHAT_TOKENS_FOR_REPLY
    assert second[:history] == first[:history]
    assert textgen.tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
