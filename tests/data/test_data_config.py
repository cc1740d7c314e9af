import pytest

from arbor_titan.data import Corpus, DataConfig, TokenizerConfig
from arbor_titan.data.config import check_data_config, check_tokenizer_config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "txt"}, "data.source must be one of 'stdlib', 'text', 'jsonl', got 'txt'"),
        ({"source": "text"}, "data.paths must name files or globs when data.source = 'text'"),
        ({"paths": ["a.txt"]}, "data.paths must be empty when data.source = 'stdlib'"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"max_files": -1}, "data.max_files must be >= 0, got -1"),
        ({"num_workers": -2}, "data.num_workers must be >= 0, got -2"),
        ({"source": "jsonl", "paths": ["a"], "text_field": ""}, "data.text_field must not be"),
    ],
)
def test_bad_data_values_name_their_key(kwargs, message):
    with pytest.raises(ValueError) as err:
        check_data_config(DataConfig(**kwargs))
    assert message in str(err.value)


def test_corpus_checks_its_config():
    with pytest.raises(ValueError, match="data.source must be one of"):
        Corpus(DataConfig(source="txt"))


@pytest.mark.parametrize(
    "kwargs, key", [({"vocab_size": 100}, "tokenizer.vocab_size"), ({"max_sentences": 0}, "max_")]
)
def test_bad_tokenizer_values_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        check_tokenizer_config(TokenizerConfig(**kwargs))


def test_defaults_are_valid_and_lists_not_shared():
    check_data_config(DataConfig())
    check_tokenizer_config(TokenizerConfig())
    first = DataConfig()
    first.paths.append("x")
    assert DataConfig().paths == []
