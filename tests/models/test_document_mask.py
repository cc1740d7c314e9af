"""Document masking: a packed batch's logits equal each document run alone, positions restart or
continue as asked, the unmasked path is untouched, and training and its refusals work."""

import json
import math
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from arbor_titan.data.config import DataConfig, check_data_config
from arbor_titan.distributed.compile import compile_blocks
from arbor_titan.models.arbor import ArborArgs, Transformer, masking
from arbor_titan.models.arbor.masking import document_inputs
from arbor_titan.models.arbor.rope import apply_rope, rope_cos_sin_at
from tests.conftest import losses, run_training

BOS, EOS, VOCAB = 1, 2, 64
# Two rows of 40 tokens; each is cut into documents by its BOS tokens. Row 0 opens with the tail
# of a document that began before the window (no BOS), as packed windows usually do.
ROW_DOCUMENTS = ([5, 9, 14, 12], [4, 22, 14])


def packed_row(lengths: list[int], generator: torch.Generator, opens_mid_document: bool):
    """`[BOS] body [EOS]` documents of the given total lengths (bodies of random tokens)."""
    row = []
    for index, length in enumerate(lengths):
        body = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        if index == 0 and opens_mid_document:
            row += body
        else:
            row += [BOS, *body[: length - 2], EOS] if index < len(lengths) - 1 else [BOS, *body[1:]]
    return row


@pytest.fixture(scope="module")
def tokens_bs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = [packed_row(lengths, generator, i == 0) for i, lengths in enumerate(ROW_DOCUMENTS)]
    assert len({len(row) for row in rows}) == 1
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A random model whose outputs depend strongly on context: weights larger than the init's,
    so attention is sharp and a token seen or unseen moves the logits visibly."""
    torch.manual_seed(0)
    args = ArborArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=VOCAB, max_seq_len=64
    )
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(std=0.15)
    return model.eval()


def documents(tokens_bs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document: spans that begin at a BOS or at the row's start."""
    spans = []
    for row, tokens_s in enumerate(tokens_bs.tolist()):
        starts = [0] + [i for i, token in enumerate(tokens_s) if token == BOS and i > 0]
        spans += [(row, a, b) for a, b in zip(starts, [*starts[1:], len(tokens_s)])]
    return spans


@torch.no_grad()
def reference_logits(model: Transformer, tokens_s: torch.Tensor, positions_s: torch.Tensor):
    """One document alone, the model's math written out: plain causal attention over its own
    tokens, RoPE at `positions_s`."""
    seq_len, head_dim = tokens_s.shape[0], model.args.head_dim
    cos_sin = rope_cos_sin_at(positions_s, *model.rope_frequencies())[:, None]  # (2,1,seq,hd)
    h_bsd = model.tok_embeddings(tokens_s[None])
    for block in model.layers.values():
        attn, x_bsd = block.attention, block.attention_norm(h_bsd)
        q, k, v = (w(x_bsd).view(1, seq_len, -1, head_dim) for w in (attn.wq, attn.wk, attn.wv))
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        h_bsd = h_bsd + attn.wo(out.transpose(1, 2).reshape(1, seq_len, -1))
        h_bsd = h_bsd + block.feed_forward(block.ffn_norm(h_bsd))
    return model.output(model.norm(h_bsd))[0]


def test_document_ids_and_restarted_positions_come_from_bos_tokens():
    tokens_bs = torch.tensor([[7, 8, BOS, 5, EOS, BOS, 6], [BOS, 5, 6, EOS, BOS, BOS, 9]])
    inputs = document_inputs(tokens_bs, BOS, restart_positions=True)
    assert inputs["document_ids_bs"].tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 3, 3]]
    assert inputs["positions_bs"].tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 0, 1]]
    assert document_inputs(tokens_bs, BOS, restart_positions=False).keys() == {"document_ids_bs"}


@pytest.mark.parametrize("restart_positions", [True, False])
def test_packed_logits_equal_each_document_alone(model, tokens_bs, restart_positions):
    inputs = document_inputs(tokens_bs, BOS, restart_positions)
    with torch.no_grad():
        packed_bsv = model(tokens_bs, **inputs)
        unmasked_bsv = model(tokens_bs)
    spans = documents(tokens_bs)
    assert len(spans) == sum(len(lengths) for lengths in ROW_DOCUMENTS)
    for row, start, end in spans:
        offset = 0 if restart_positions else start
        positions_s = torch.arange(offset, offset + end - start)
        alone_sv = reference_logits(model, tokens_bs[row, start:end], positions_s)
        torch.testing.assert_close(packed_bsv[row, start:end], alone_sv, rtol=0, atol=1e-5)
        if start > 0:  # the test can fail: without the mask, later documents see earlier ones
            assert (unmasked_bsv[row, start:end] - alone_sv).abs().max() > 1e-2
    if restart_positions:  # restarted positions: a document alone is the plain model's forward
        row, start, end = spans[-1]
        with torch.no_grad():
            plain_sv = model(tokens_bs[row : row + 1, start:end])[0]
        torch.testing.assert_close(packed_bsv[row, start:end], plain_sv, rtol=0, atol=1e-5)


def test_without_documents_the_causal_fast_path_is_unchanged(model, tokens_bs, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(masking.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        logits_bsv = model(tokens_bs)
    assert calls and all(c.get("is_causal") and c.get("attn_mask") is None for c in calls)
    positions_s = torch.arange(tokens_bs.shape[1])
    for row in range(tokens_bs.shape[0]):
        assert torch.equal(logits_bsv[row], reference_logits(model, tokens_bs[row], positions_s))


def test_masked_forward_compiles_with_fullgraph_blocks(model, tokens_bs):
    inputs = document_inputs(tokens_bs, BOS, restart_positions=True)
    with torch.no_grad():
        eager_bsv = model(tokens_bs, **inputs)
    compiled = Transformer(model.args)
    compiled.load_state_dict(model.state_dict())
    # What `compile_blocks` does, with the cheaper aot_eager backend: fullgraph=True makes a
    # graph break raise, and AOT autograd traces the masked attention's backward too.
    backend = CompileCounterWithBackend("aot_eager")
    for block in compiled.layers.values():
        block.compile(fullgraph=True, backend=backend)
    logits_bsv = compiled(tokens_bs, **inputs)
    logits_bsv.sum().backward()
    assert backend.frame_count >= 1
    torch.testing.assert_close(logits_bsv.detach(), eager_bsv, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_model", [False, True])
def test_flex_attention_matches_the_sdpa_mask_on_cuda(model, compile_model, monkeypatch):
    # 300 tokens: several 128-token tiles and a partial one; tiles fully masked and partial.
    generator = torch.Generator().manual_seed(1)
    rows = [packed_row([40, 110, 7, 143], generator, True), packed_row([300], generator, False)]
    tokens_bs = torch.tensor(rows, device="cuda")
    cuda_model = Transformer(replace(model.args, max_seq_len=512)).cuda().eval()
    cuda_model.load_state_dict(model.state_dict())
    if compile_model:
        compile_blocks(cuda_model.layers)
    inputs = document_inputs(tokens_bs, BOS, restart_positions=True)
    assert isinstance(masking.document_mask(inputs["document_ids_bs"]), masking.BlockMask)
    with torch.no_grad():
        flex_bsv = cuda_model(tokens_bs, **inputs)
        monkeypatch.setattr(masking, "uses_flex_attention", lambda device: False)
        sdpa_bsv = cuda_model(tokens_bs, **inputs)
    torch.testing.assert_close(flex_bsv, sdpa_bsv, rtol=1e-4, atol=1e-4)


def test_restart_positions_needs_document_mask():
    with pytest.raises(ValueError, match=r"data\.restart_positions = true needs data\.document"):
        check_data_config(DataConfig(restart_positions=True))
    check_data_config(DataConfig(document_mask=True, restart_positions=True))


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory) -> list[str]:
    """A JSONL corpus of short documents (stdlib source lines), so every training window packs
    several of them whatever the window's offset (a paragraph can outlast a 64-token window,
    and then the document mask changes nothing)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((lib / name).read_text() for name in ("textwrap.py", "shlex.py", "argparse.py"))
    lines = [line for line in text.splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("short_documents") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return ["--data.source=jsonl", f"--data.paths=['{path}']", "--data.val_fraction=0.1"]


@pytest.mark.slow
def test_training_with_document_mask_and_restarted_positions(dump_folder, short_corpus):
    common = [
        *short_corpus,
        "--training.steps=3",
        "--validation.enable=true",
        "--validation.steps=1",
    ]
    run_training(dump_folder, "doc_plain", *common)
    masked = ["--data.document_mask=true", "--data.restart_positions=true"]
    run_training(dump_folder, "doc_masked", *common, *masked)
    plain, packed = losses(dump_folder, "doc_plain"), losses(dump_folder, "doc_masked")
    assert sorted(packed) == [1, 2, 3] and all(math.isfinite(v) for v in packed.values())
    records = (dump_folder / "doc_masked" / "metrics.jsonl").read_text().splitlines()
    val_losses = [json.loads(r)["val_loss"] for r in records if "val_loss" in r]
    assert len(val_losses) == 1 and math.isfinite(val_losses[0])  # evaluation runs masked too
    # Same weights and batch at step 1: only the mask and the positions can change the loss.
    assert packed[1] != plain[1]


@pytest.mark.slow
def test_pipeline_parallel_with_document_mask_stops_at_start_up(dump_folder, short_corpus):
    result = run_training(
        dump_folder,
        "doc_pp",
        *short_corpus,
        "--parallelism.pipeline_parallel_degree=2",
        "--data.document_mask=true",
        nproc=2,
        check=False,
    )
    assert result.returncode != 0
    assert "data.document_mask = true is not supported with pipeline parallelism" in result.stderr
    assert "parallelism.pipeline_parallel_degree = 2" in result.stderr
