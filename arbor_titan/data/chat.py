"""Chat data (`data.source = "chat"`): JSONL conversations for supervised fine-tuning.

Each line is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`
or `{"prompt": "...", "response": "..."}`. A malformed line is skipped and counted, and the first
few are logged as `file:line: what is wrong`; a file without one usable conversation stops the
run with that message.

Conversations are rendered with the chat template (`chat_template.py`) and packed like
pre-training documents, `[BOS] conversation [BOS] conversation ...`, with document masking so one
never attends to another. The loss mask travels inside the token stream: an answer token (one the
model is trained to produce) is stored as `id | ANSWER_FLAG`. Every window the loader cuts, from
any lane, after any resume, reshard or shape change, thus carries its own mask, and the loader
itself is the pre-training one; `answer_labels` turns a window into inputs and labels.
"""

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from arbor_titan.data.cache import atomic_path, cache_key, file_sha1
from arbor_titan.data.chat_template import JINJA_TEMPLATE, ROLES, Message, encode_conversations
from arbor_titan.data.config import DataConfig, TokenizerConfig
from arbor_titan.data.corpus import SPLITS, Corpus, describe_skips, unit_hash
from arbor_titan.data.token_cache import TokenCache
from arbor_titan.data.tokenizer import Tokenizer, load_tokenizer
from arbor_titan.models.arbor.loss import IGNORE_INDEX

logger = logging.getLogger("arbor_titan")

ANSWER_FLAG = 1 << 30  # above any token id: marks an answer token in the stored stream
_DTYPE = np.dtype(np.int32)
_FORMAT = 1  # part of the cache key: bump when the file layout changes
_ENCODE_BATCH = 2048  # conversations handed to one batched encode call
_REPORTED = 5  # malformed lines logged one by one per file; the rest are counted


def parse_conversation(record: object) -> list[Message]:
    """The messages of one JSONL record; ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("a line must be a JSON object")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("'messages' must be a non-empty list")
        messages = [_message(i, m) for i, m in enumerate(raw)]
    elif "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError("'prompt' and 'response' must both be strings")
        messages = [Message("user", prompt), Message("assistant", response)]
    else:
        raise ValueError(
            "a line needs 'messages' (a list of role/content objects) or 'prompt' and 'response'"
        )
    if not any(m.role == "assistant" and m.content for m in messages):
        raise ValueError("no non-empty assistant message: nothing to learn from")
    return messages


def _message(index: int, raw: object) -> Message:
    if not isinstance(raw, dict):
        raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
    role, content = raw.get("role"), raw.get("content")
    if role not in ROLES:
        raise ValueError(f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}].content must be a string")
    return Message(role, content)


def read_conversations(
    name: str, path: Path, skipped: Counter, problems: list[str]
) -> Iterator[tuple[str, list[Message]]]:
    """`(f"{name}:{line}", messages)` per usable line of one file; each malformed line adds its
    reason to `skipped` and `f"{path}:{line}: what is wrong"` to `problems`."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                messages = parse_conversation(json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError:
                skipped["invalid UTF-8"] += 1
                problems.append(f"{path}:{lineno}: invalid UTF-8")
            except json.JSONDecodeError as err:
                skipped["invalid JSON"] += 1
                problems.append(f"{path}:{lineno}: invalid JSON ({err.msg})")
            except ValueError as err:
                skipped["malformed conversation"] += 1
                problems.append(f"{path}:{lineno}: {err}")
            else:
                yield f"{name}:{lineno}", messages


def flag_answers(ids: list[int], is_answer: list[bool]) -> np.ndarray:
    """A conversation's tokens as stored: answer tokens carry ANSWER_FLAG."""
    stream = np.array(ids, _DTYPE)
    stream[np.array(is_answer, bool)] |= ANSWER_FLAG
    return stream


def answer_labels(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a window of the flagged stream: a label counts only where the next
    token is an answer token, the others are IGNORE_INDEX."""
    is_answer = (window & ANSWER_FLAG) != 0
    tokens = window & (ANSWER_FLAG - 1)
    labels = torch.where(is_answer[1:], tokens[1:], IGNORE_INDEX)
    return tokens[:-1], labels


def prepare_chat(
    data_cfg: DataConfig, tok_cfg: TokenizerConfig, cache_dir: Path, log: Callable[[str], None]
) -> tuple[Tokenizer, TokenCache]:
    """The pre-trained model's tokenizer and the chat token cache (built once, then reused)."""
    if not tok_cfg.path:
        raise ValueError(
            "data.source = 'chat' needs tokenizer.path: the tokenizer of the model being "
            "fine-tuned (a checkpoint holds it as tokenizer.model)"
        )
    tokenizer = load_tokenizer(Path(tok_cfg.path), tok_cfg.bos_token, tok_cfg.eos_token)
    if tokenizer.vocab_size > ANSWER_FLAG:
        raise ValueError(f"tokenizer.path: a vocabulary of {tokenizer.vocab_size:,} is too large")
    corpus = Corpus(data_cfg)
    specials = (tokenizer.bos_id, tokenizer.eos_id)
    key = cache_key(
        _FORMAT, file_sha1(tokenizer.path), specials, corpus.fingerprint, JINJA_TEMPLATE
    )
    sidecar = Path(cache_dir) / f"chat-{key}.json"
    paths = {split: sidecar.with_name(f"chat-{key}-{split}.bin") for split in SPLITS}
    if not sidecar.exists():
        _build(tokenizer, corpus, paths, sidecar, log)
    else:
        log(f"reusing chat token cache {sidecar}")
    meta = json.loads(sidecar.read_text())
    cache = TokenCache.of_files(paths, _DTYPE, meta["tokens"], meta["docs"], meta["skipped"])
    log(
        f"chat data: train {cache.num_docs['train']} conversations ({cache.num_tokens['train']:,} "
        f"tokens, {meta['answer_tokens']['train']:,} of them answer tokens), val "
        f"{cache.num_docs['val']} conversations ({cache.num_tokens['val']:,} tokens); "
        f"{describe_skips(cache.skipped)}"
    )
    return tokenizer, cache


def _build(
    tokenizer: Tokenizer,
    corpus: Corpus,
    paths: dict[str, Path],
    sidecar: Path,
    log: Callable[[str], None],
) -> None:
    start = time.perf_counter()
    tokens, docs, answers = (dict.fromkeys(SPLITS, 0) for _ in range(3))
    skipped: Counter = Counter()
    with ExitStack() as stack:  # unwinds in reverse: files close before they move into place
        tmp_paths = {split: stack.enter_context(atomic_path(p)) for split, p in paths.items()}
        files = {split: stack.enter_context(p.open("wb")) for split, p in tmp_paths.items()}
        for name, path in corpus.files:
            problems: list[str] = []
            usable = 0
            for batch in _batches(read_conversations(name, path, skipped, problems)):
                encoded = encode_conversations([messages for _, messages in batch], tokenizer)
                for (doc, _), (ids, is_answer) in zip(batch, encoded):
                    split = "val" if unit_hash(doc) < corpus.cfg.val_fraction else "train"
                    files[split].write(flag_answers(ids, is_answer).tobytes())
                    tokens[split] += len(ids)
                    docs[split] += 1
                    answers[split] += sum(is_answer)
                usable += len(batch)
            for problem in problems[:_REPORTED]:
                logger.warning("skipped %s", problem)
            if len(problems) > _REPORTED:
                logger.warning(
                    "skipped %d more malformed lines of %s", len(problems) - _REPORTED, path
                )
            if not usable:
                first = f": {problems[0]}" if problems else ": it is empty"
                raise ValueError(f"data.paths: {path} holds no usable conversation{first}")
    if not docs["train"]:
        raise ValueError(
            f"data.val_fraction = {corpus.cfg.val_fraction} held out every conversation: "
            "none is left to train on"
        )
    meta = {"tokens": tokens, "docs": docs, "answer_tokens": answers, "skipped": skipped}
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    log(f"tokenized {sum(docs.values())} conversations in {time.perf_counter() - start:.1f}s")


def _batches(
    conversations: Iterator[tuple[str, list[Message]]],
) -> Iterator[list[tuple[str, list[Message]]]]:
    batch = []
    for conversation in conversations:
        batch.append(conversation)
        if len(batch) == _ENCODE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
