import pytest

from arbor_titan.data import Corpus, DataConfig
from arbor_titan.data.config import check_data_config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"source": "txt"},
            "data.source must be one of 'stdlib', 'text', 'jsonl', 'parquet', 'hf_disk', 'chat', "
            "got 'txt'",
        ),
        ({"source": "chat", "paths": ["a"]}, "needs data.document_mask = true"),
        (
            {"source": "chat", "paths": ["a"], "document_mask": True, "text_field": "body"},
            "data.text_field does not apply to data.source = 'chat'",
        ),
        (
            {"source": "chat", "paths": ["a"], "document_mask": True, "prepare_workers": 2},
            "data.prepare_workers does not apply to data.source = 'chat'",
        ),
        ({"source": "text"}, "data.paths must name files or globs when data.source = 'text'"),
        ({"paths": ["a.txt"]}, "data.paths must be empty when data.source = 'stdlib'"),
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


def test_defaults_are_valid_and_lists_not_shared():
    check_data_config(DataConfig())
    first = DataConfig()
    first.paths.append("x")
    assert DataConfig().paths == []
