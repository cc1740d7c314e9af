"""Activation memory: the bytes autograd keeps for backward, per block and micro-batch, as PyTorch
2.13's eager kernels keep them for the Arbor block, and how many micro-batches a pipeline
schedule keeps alive at once.

Every term below names the tensors it counts. They were read off the saved-tensor hooks of the
real block (tests/estimate/test_estimate_memory.py checks the totals against a measurement,
tests/scripts/test_bench_long_context.py under context parallelism and the chunked loss):

- RMSNorm: CUDA has a fused kernel that saves its input and the fp32 1/rms per token; elsewhere
  the composite saves an fp32 copy of the input, the fp32 normalized value and 1/rms.
- A linear saves its input. Under FSDP mixed precision the inputs already are bf16 and wq/wk/wv
  share one; under autocast every consumer casts its own copy (3 in attention, 2 in the FFN).
- Attention (flash/efficient SDPA) saves q, k, v, its output and an fp32 log-sum-exp per head.
  When tp does not divide the kv heads, k and v hold a copy per local query head and the wk/wv
  outputs are the kv heads those read (models/arbor/parallelize.py `ReplicatedKV`).
- RoPE: the fp32 cos and sin of the held positions, computed once per forward for all blocks.
- SwiGLU saves w1's and w3's outputs, silu(w1 x) and their product (w2's input).
- Loss: log_softmax keeps fp32 log-probabilities (vocab-sharded under loss parallel); the
  chunked loss (`training.loss_chunk_len`) keeps none: each chunk's logits are recomputed in
  backward, where one chunk's fp32 logits, log-probabilities and their gradient coexist.
- Context parallel: attention keeps the K/V all-gathered from the cp group (the whole
  sequence's, local heads) instead of the local ones; backward holds their full-length gradient.
  Each of a rank's two query chunks is its own SDPA call, which keeps that chunk's output, so
  wo's input (their concatenation) is a second copy of the attention output. Off CUDA a chunk's
  causal mask over a longer prefix is a strided view of one short vector
  (distributed/context_parallel.py `ReversedPrefixCausal`), not counted: no chunk × prefix
  tensor exists.
- torch's ring attention (`context_parallel_attention = "torch_ring"`; read off torch's
  code, not measured: it needs 2 GPUs) takes K/V repeated to the query heads; its one SDPA call
  keeps the local q, repeated k and v, output and log-sum-exp, and backward gathers the whole
  sequence's repeated K/V again beside their gradient.

torch.compile only removes saved tensors (its partitioner recomputes cheap pointwise ops), so
for compiled blocks these eager figures are an upper bound.
"""

from collections import Counter
from dataclasses import dataclass

from arbor_titan.models.arbor import ArborArgs
from arbor_titan.models.arbor.parallelize import local_kv_heads

FP32 = 4
INDEX_BYTES = 8  # token ids and targets are int64


@dataclass(frozen=True)
class ActivationModel:
    """Saved bytes for one micro-batch on one rank.

    `tokens` is micro-batch × seq_len / cp (this rank's share of each sequence); `seq_tokens`
    the part of it this rank holds between blocks (tokens / tp under sequence parallel); `tp`
    divides heads, FFN width and the vocabulary; `cp` ranks gather each other's keys and values.
    """

    args: ArborArgs
    tokens: int
    seq_tokens: int
    tp: int
    compute_bytes: int  # bf16 2, fp32 4
    residual_bytes: int  # the residual stream: fp32 under autocast (the embedding isn't cast)
    autocast: bool  # bf16 without FSDP: autocast, not FSDP mixed precision
    fused_norm: bool  # CUDA's fused RMSNorm
    vocab_shards: int  # tp under loss parallel, else 1
    cp: int = 1
    loss_chunk_tokens: int = 0  # tokens scored at once by the chunked loss; 0: unchunked
    micro_batch: int = 1  # sequences in `tokens`
    ring_attention: bool = False  # cp through torch's ring attention, not the K/V all-gather

    def norm(self, tokens: int) -> int:
        dim = self.args.dim
        if self.fused_norm:
            return tokens * dim * self.residual_bytes + tokens * FP32
        return 2 * tokens * dim * FP32 + tokens * FP32

    def block(self, mode: str) -> int:
        """One transformer block; mode is its checkpointing: none, full or op (selective)."""
        a, t, e = self.args, self.tokens, self.compute_bytes
        q_dim = a.n_heads * a.head_dim
        projected_kv = local_kv_heads(a.n_heads, a.n_kv_heads, self.tp)[0]
        block_input = self.seq_tokens * a.dim * self.residual_bytes
        # Attention's q, k and v; under kv replication k and v hold a copy per query head.
        qkv = t * (q_dim // self.tp + 2 * self.attended_kv_heads() * a.head_dim) * e
        attention_out = t * q_dim * e // self.tp
        log_sum_exp = t * a.n_heads * FP32 // self.tp
        gathered_kv = self.gathered_kv()
        ffn_hidden = t * a.ffn_dim * e // self.tp
        if mode == "full":
            return block_input
        if mode == "op":
            # Checkpoint input, then every matmul output (wo's and w2's are the full-width
            # partial sums before the TP reduce-scatter) and attention's outputs.
            qkv_matmuls = t * (q_dim // self.tp + 2 * projected_kv * a.head_dim) * e
            matmuls = qkv_matmuls + 2 * t * a.dim * e + 2 * ffn_hidden
            # The gathered K/V and the chunks' concatenation are no matmul or attention
            # outputs: recomputed (the gather re-run).
            return block_input + matmuls + attention_out + log_sum_exp
        # Gathered over the sequence: every token. autocast casts per consumer (wq, wk, wv, w1,
        # w3); FSDP mixed precision computes in bf16 already, so wq/wk/wv share one input.
        linear_inputs = (5 if self.autocast else 2) * t * a.dim * e
        norms = 2 * self.norm(self.seq_tokens)
        # Under the all-gather cp wo's input is a concatenation of the chunks' outputs, which
        # SDPA keeps too.
        attention_outs = (2 if self.cp > 1 and not self.ring_attention else 1) * attention_out
        return (
            norms
            + linear_inputs
            + qkv
            + gathered_kv
            + attention_outs
            + log_sum_exp
            + 4 * ffn_hidden
        )

    def attended_kv_heads(self) -> int:
        """Key/value heads this rank's attention reads: torch's ring attention repeats them to
        the query heads."""
        a = self.args
        if self.ring_attention:
            return a.n_heads // self.tp
        return local_kv_heads(a.n_heads, a.n_kv_heads, self.tp)[1]

    def sequence_kv(self) -> int:
        """Keys and values of the whole sequences (every cp rank's tokens), as attention reads
        them."""
        a = self.args
        kv_dim = 2 * self.attended_kv_heads() * a.head_dim
        return self.cp * self.tokens * kv_dim * self.compute_bytes

    def gathered_kv(self) -> int:
        """Keys and values of the other cp ranks' tokens, kept by the all-gather's attention
        (the ring's keeps only its own)."""
        if self.cp == 1 or self.ring_attention:
            return 0
        return self.sequence_kv() * (self.cp - 1) // self.cp

    def recompute(self, mode: str) -> int:
        """What backward re-creates for one checkpointed block, on top of what it kept."""
        return self.block("none") - self.block(mode)

    def block_backward_working(self, mode: str) -> int:
        """Recomputed activations plus the SwiGLU's two hidden-width input gradients."""
        gate_grads = 2 * self.tokens * self.args.ffn_dim * self.compute_bytes // self.tp
        # The whole sequence's K/V gradient; the ring gathers the K/V themselves again too.
        sequence_kv = 0 if self.cp == 1 else self.sequence_kv() * (2 if self.ring_attention else 1)
        return self.recompute(mode) + gate_grads + sequence_kv

    def embedding(self) -> int:
        return self.tokens * INDEX_BYTES

    def rope(self) -> int:
        """RoPE's fp32 cos and sin for the positions of a sequence this rank holds: computed once
        per forward by every stage, kept by its blocks, shared by the micro-batch's sequences."""
        return 2 * (self.tokens // self.micro_batch) * self.args.head_dim * FP32

    def head(self) -> int:
        """Final norm, the output projection's input, fp32 log-probabilities and the targets."""
        log_probs = 0 if self.loss_chunk_tokens else self.log_probs(self.tokens)
        output_input = self.tokens * self.args.dim * self.compute_bytes
        return self.norm(self.seq_tokens) + output_input + log_probs + self.tokens * INDEX_BYTES

    def log_probs(self, tokens: int) -> int:
        return tokens * self.args.vocab_size * FP32 // self.vocab_shards

    def loss_backward_working(self) -> int:
        """log_softmax's backward holds its fp32 input and output gradients at once; a chunk's
        backward also its recomputed logits."""
        if self.loss_chunk_tokens:
            return 3 * self.log_probs(min(self.loss_chunk_tokens, self.tokens))
        return 2 * self.log_probs(self.tokens)

    def stage_output(self) -> int:
        """A pipeline stage keeps each micro-batch's output until its backward."""
        return self.seq_tokens * self.args.dim * self.residual_bytes


def peak_in_flight(
    actions: list[tuple[str, int]], stage_bytes: dict[int, int]
) -> tuple[int, dict[int, int]]:
    """Walk a rank's schedule: a forward (F) adds a micro-batch's activations to its stage, a
    full (B) or weight (W) backward frees them (an input backward, I, keeps them: the graph is
    retained for W). Returns the peak bytes and the micro-batches per stage at that peak."""
    live: Counter[int] = Counter()
    peak, at_peak = 0, {}
    for kind, stage in actions:
        if kind == "F":
            live[stage] += 1
        held = sum(count * stage_bytes[s] for s, count in live.items())
        if held > peak:
            peak, at_peak = held, {s: c for s, c in live.items() if c}
        if kind in ("B", "W"):
            live[stage] -= 1
    return peak, at_peak
