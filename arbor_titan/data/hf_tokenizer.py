"""A Hugging Face `tokenizer.json` (e.g. Llama 3's 128,256-token vocabulary), loaded with the
`tokenizers` library behind the same interface as the sentencepiece tokenizer.

Text is only text: a special token's name inside a document (`<|begin_of_text|>` in a web page)
is encoded as ordinary pieces, never as the special id, so a document can't smuggle a BOS into
the packed stream (where BOS tokens mark document starts).
"""

from pathlib import Path

from tokenizers import Tokenizer as _HFModel

# Special tokens recognised as BOS / EOS when `tokenizer.bos_token` / `eos_token` are empty:
# Llama 3, Llama 2 / Mistral (sentencepiece-derived), Gemma, BERT-style.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")


class HFTokenizer:
    """Text ↔ token ids of a `tokenizer.json`, without BOS/EOS unless the caller adds them."""

    def __init__(self, path: Path, bos_token: str = "", eos_token: str = ""):
        self._path = Path(path)
        self._names = (bos_token, eos_token)
        try:
            self._hf = _HFModel.from_file(str(self._path))
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(
                f"tokenizer.path: {str(path)!r} is not a tokenizer.json: {err}"
            ) from None
        self._hf.encode_special_tokens = True  # special names in the text are text
        self.bos_id = self._special_id(bos_token, BOS_NAMES, "bos_token")
        self.eos_id = self._special_id(eos_token, EOS_NAMES, "eos_token")
        if self.bos_id == self.eos_id:
            raise ValueError(
                f"tokenizer.path: {str(path)!r}: BOS and EOS are the same token (id {self.bos_id})"
                "; packing marks document starts with BOS, so set tokenizer.bos_token and "
                "tokenizer.eos_token to two different special tokens"
            )

    def __reduce__(self) -> tuple:
        """Pickles as its file and token names: a worker process loads the file itself."""
        return HFTokenizer, (self._path, *self._names)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores (the library's own thread pool)."""
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids)

    def _special_id(self, given: str, names: tuple[str, ...], key: str) -> int:
        """The id of the token named `given`, else of the first of `names` the file has."""
        for name in (given,) if given else names:
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                return token_id
        if given:
            raise ValueError(f"tokenizer.{key}: {given!r} is not a token of {self._path}")
        specials = sorted(t.content for t in self._hf.get_added_tokens_decoder().values())
        raise ValueError(
            f"tokenizer.path: {self._path} has none of {list(names)}; name its "
            f"{key.split('_')[0].upper()} token with tokenizer.{key} (its special tokens: "
            f"{specials[:20]})"
        )
