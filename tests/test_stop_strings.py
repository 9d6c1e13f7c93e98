"""The streaming stop-string matcher against a brute-force reference, and stop strings in the engine."""
from __future__ import annotations

import random
import time

import pytest

from tests.checkpoints import make_text_checkpoint
from workers import Engine, SamplingParams
from workers.stop_strings import StopStringMatcher
from workers.tokenizer import IncrementalDetokenizer


# ---- brute-force reference (what the engine did before: search the whole text every token) -------------
def ref_cut(text: str, stops: list[str], searched_until: int) -> int | None:
    """Start of the earliest stop-string occurrence that ends after `searched_until` (the text before it was
    already searched), or None."""
    starts = [p for s in stops for p in range(len(text) - len(s) + 1)
              if text.startswith(s, p) and p + len(s) > searched_until]
    return min(starts, default=None)


def ref_holdback(text: str, stops: list[str]) -> int:
    """Longest suffix of `text` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
               default=0)


def chunks(rng: random.Random, text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 1, 2, 3, 5, 8])
        out.append(text[i:i + n])
        i += n
    return out


# ---- the matcher -----------------------------------------------------------------------------------------
def test_examples():
    m = StopStringMatcher(["world"])
    assert m.feed("Hello wor") is None and m.holdback == 3
    assert m.feed("ld!") == 6
    m = StopStringMatcher(["END", "STOP"])
    assert m.feed("abcSTOPxyzEND") == 3                 # the earliest wins, whatever the order
    assert StopStringMatcher(["STOP", "cST"]).feed("abcSTOP") == 2   # overlapping: the earliest start
    m = StopStringMatcher(["abcd", "bc"])
    assert m.feed("ab") is None and m.holdback == 2
    assert m.feed("cd") == 0                            # both complete in this chunk: abcd starts first
    m = StopStringMatcher(["abcd", "bc"])
    m.feed("ab")
    assert m.feed("c") == 1                             # bc completes first, abcd never gets the chance
    m = StopStringMatcher(["</end>", "<|eot|>"])
    assert m.feed("Hello <") is None and m.holdback == 1
    assert m.feed("b") is None and m.holdback == 0      # a false start is released
    m = StopStringMatcher(["ab", "bcd"])
    assert m.feed("xab"[:2]) is None and m.holdback == 1
    m = StopStringMatcher(["🙂!"])
    assert m.feed("hé🙂") is None and m.holdback == 1  # characters, not bytes
    assert m.feed("!") == 2


ALPHABETS = ["ab", "abc", "ab<>/ \n", "aé🙂ß"]


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_streams(seed):
    rng = random.Random(seed)
    for _ in range(500):
        alphabet = rng.choice(ALPHABETS)
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.3:  # stops that are prefixes / suffixes / infixes of each other
            base = stops[0] + "".join(rng.choice(alphabet) for _ in range(3))
            stops += [base, base[1:], base[:-1], base[1:-1] or base]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        m, fed = StopStringMatcher(stops), ""
        for piece in chunks(rng, text):
            cut = m.feed(piece)
            expected = ref_cut(fed + piece, stops, len(fed))
            fed += piece
            assert cut == expected, (stops, fed, piece)
            if cut is not None:
                break
            assert m.holdback == ref_holdback(fed, stops), (stops, fed)


def stream(pieces: list[str], stops: list[str]) -> tuple[str, str]:
    """What the engine does per token: feed the new text; stop at a cut, else stream all but the holdback."""
    m, text, streamed = StopStringMatcher(stops), "", ""
    for piece in pieces:
        text += piece
        cut = m.feed(piece)
        if cut is not None:
            assert cut >= len(streamed)  # nothing already streamed was part of the stop string
            return streamed + text[len(streamed):cut], "stop"
        safe = len(text) - m.holdback
        assert safe >= len(streamed)    # the stream never has to take anything back
        streamed = text[:safe]
    return text, "length"               # finished for another reason: flush what was held


def test_streaming_never_emits_part_of_a_stop_string():
    assert stream(["Hi", " there", "</", "en", "d>", "tail"], ["</end>"]) == ("Hi there", "stop")
    assert stream(["a <", "/b", "> c"], ["</end>"]) == ("a </b> c", "length")


def test_per_token_cost_micro_check(capsys):
    """Not a timed assertion: prints what one token costs the matcher with 16 stops x 256 chars vs none."""
    rng = random.Random(0)
    stops = ["".join(rng.choice("abcdefgh") for _ in range(256)) for _ in range(16)]
    tokens = ["".join(rng.choice("abcdefgh ") for _ in range(4)) for _ in range(4000)]

    def per_token_us(matcher):
        t0 = time.perf_counter()
        for tok in tokens:
            if matcher is not None:
                matcher.feed(tok)
                _ = matcher.holdback
        return (time.perf_counter() - t0) / len(tokens) * 1e6

    StopStringMatcher(stops)  # build (cached) outside the timing
    with capsys.disabled():
        print(f"\nstop matcher per token: {per_token_us(StopStringMatcher(stops)):.2f} us with 16 stops x 256 chars, "
              f"{per_token_us(None):.2f} us with none (over {sum(map(len, tokens))} chars of text)")


# ---- in the engine -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine.from_pretrained(make_text_checkpoint(tmp_path_factory.mktemp("ckpt")), dtype="float32",
                                 show_progress=False)
    yield eng
    eng.shutdown()


def run_streaming(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    deltas = []
    while engine.has_unfinished():
        deltas += [d for d in engine.step() if d.request_id == rid]
    return deltas


def test_engine_cuts_at_the_earliest_stop_and_streams_no_part_of_it(engine):
    prompt = [1, 17, 42, 99, 7]
    free = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    token_ids = engine.generate([prompt], free)[0].token_ids
    detok = IncrementalDetokenizer(engine.tokenizer, prompt)
    pieces = [detok.add(t) for t in token_ids]
    text = "".join(pieces)
    assert len(text) > 20
    rng = random.Random(1)
    for _ in range(10):
        a = rng.randrange(5, len(text) - 4)
        stops = [text[a:a + rng.randint(1, 4)], text[rng.randrange(len(text) - 2):][:2]]
        # The reference: token by token, the first token whose text completes a stop string cuts there.
        expected, so_far = text, ""
        for piece in pieces:
            cut = ref_cut(so_far + piece, stops, len(so_far))
            so_far += piece
            if cut is not None:
                expected = so_far[:cut]
                break
        deltas = run_streaming(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                              stop=stops))
        assert "".join(d.text for d in deltas) == expected, stops
        assert deltas[-1].finish_reason == ("stop" if expected != text else "length")
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
