"""Byte-level tokenizer: ids 0-255 are bytes, BOS = 256, EOS = 257, optional FIM tokens after that."""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

BOS_ID = 256
EOS_ID = 257
BASE_VOCAB_SIZE = 258
# Fill-in-the-middle: <prefix> PRE <suffix> SUF <middle> MID ... (switched on by ModelConfig.fim)
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID = 258, 259, 260


class ByteTokenizer:
    """UTF-8 bytes in, bytes out. Encoding round-trips exactly; decoding never raises."""

    def __init__(self, fim: bool = False) -> None:
        self.fim = fim
        self.vocab_size = BASE_VOCAB_SIZE + (len(FIM_TOKENS) if fim else 0)
        self.bos_id, self.eos_id = BOS_ID, EOS_ID

    def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
        return ([BOS_ID] if add_bos else []) + list(data) + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes to text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def decode_bytes(ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """Prompt for fill-in-the-middle in PSM order; the model then writes the middle."""
        if not self.fim:
            raise ValueError("this model was not trained with fill-in-the-middle tokens (config.fim is false)")
        return [BOS_ID, FIM_PREFIX_ID, *self.encode(prefix, add_bos=False), FIM_SUFFIX_ID,
                *self.encode(suffix, add_bos=False), FIM_MIDDLE_ID]


class StreamDecoder:
    """Turns a stream of byte ids into text pieces without ever splitting a UTF-8 character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < 256:
            return ""
        return self._decoder.decode(bytes([token_id]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        for token_id in ids:
            piece = self.push(token_id)
            if piece:
                yield piece
