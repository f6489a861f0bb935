from hypothesis import given, strategies as st

from axl_model.tokenizer import BOS_ID, EOS_ID, FIM_MIDDLE_ID, ByteTokenizer, StreamDecoder


@given(st.text())
def test_encode_decode_round_trips_any_string(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids[0] == BOS_ID and all(0 <= i < 256 for i in ids[1:])
    assert tokenizer.decode(ids) == text


@given(st.binary())
def test_decoding_arbitrary_bytes_never_raises(data):
    text = ByteTokenizer().decode(list(data) + [EOS_ID])
    assert isinstance(text, str)


def test_vocab_sizes_and_fim_tokens():
    assert ByteTokenizer().vocab_size == 258
    fim = ByteTokenizer(fim=True)
    assert fim.vocab_size == 261
    ids = fim.encode_fim("def f(", "):\n")
    assert ids[-1] == FIM_MIDDLE_ID and fim.decode(ids) == "def f():\n"


def test_fim_requires_the_config_switch():
    try:
        ByteTokenizer().encode_fim("a", "b")
    except ValueError as exc:
        assert "fill-in-the-middle" in str(exc)
    else:
        raise AssertionError("expected ValueError")


@given(st.text(min_size=1))
def test_stream_decoder_never_splits_a_character(text):
    decoder = StreamDecoder()
    pieces = list(decoder.feed(text.encode("utf-8", "surrogatepass"))) + [decoder.flush()]
    joined = "".join(pieces)
    if any("\ud800" <= c <= "\udfff" for c in text):
        return  # lone surrogates are not valid UTF-8 to begin with
    assert joined == text
    assert all("\ufffd" not in p for p in pieces)
