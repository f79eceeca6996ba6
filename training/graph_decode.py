"""The decode step on static buffers, recorded once and replayed: CUDA graphs on a GPU, torch.compile on a CPU.

The KV engine (kv_decode.py) launches every kernel of a decode step from Python. On one
H200 that is about 40 ms per token for a 1.5B model at 256 rows, several times the
memory-bandwidth floor (BENCHMARKS.md, GPU_BASELINE.md): the step is bound by launch
overhead, not by the GPU. Here one decode step (the forward of each row's newest token,
temperature and top-p sampling, the EOS bookkeeping and the writes into the outputs) reads
and writes only buffers allocated once per call, so it can be recorded and replayed:

- the buffers hold a bucket of rows (:func:`row_buckets`) and the step attends to the first
  L key columns of the cache, L the smallest multiple of ``key_block`` that holds the step's
  column, so early tokens do not read the whole cache;
- when enough rows have finished that the live ones fit a smaller bucket, they move to the
  front of the buffers and that bucket's step runs from then on, so finished rows stop
  costing (the KV engine compacts its cache for the same reason);
- each row's uniform draw for sampling is made outside the step, by the caller's
  generator, into a buffer the step reads: a recording holds no random-generator state;
- a step is recorded for each (rows, key columns) bucket a call reaches, when it first
  reaches it. Rows only shrink and columns only grow, so a call records at most one step
  per row bucket plus one per key bucket.

Backends: "cuda-graph" records each bucket's step with ``torch.cuda.CUDAGraph`` (the
eager kernels, replayed with one launch); "compile" runs it through ``torch.compile``
(inductor, one compilation per bucket: what a CPU offers, and slow to start); "eager" runs
the same step uncompiled, the reference the tests compare the others with. The prefill
(the prompts' forward) runs eagerly, as in the KV engine.
"""

from __future__ import annotations

import torch

from concise_rl.errors import ConfigError
from concise_rl.training import preempt
from concise_rl.training.kv_decode import KVDecoder, _position_ids, pick

BACKENDS = ("cuda-graph", "compile", "eager")
# One compilation per (rows, keys) bucket a call reaches (rows only shrink and columns only grow: a few
# dozen at most). Past dynamo's default limit (8) it would quietly run eagerly; past this one it fails.
RECOMPILE_LIMIT = 256


def row_buckets(batch: int) -> list[int]:
    """The row counts a call of ``batch`` rows runs its step at, largest first: ``batch`` itself, then
    the powers of two and their halfway points (..., 32, 48, 64, 96, ...) below it."""
    ladder, power = set(), 1
    while power < batch:
        ladder.update(b for b in (power, power + power // 2) if b < batch)
        power *= 2
    return [batch, *sorted(ladder, reverse=True)]


def default_backend(device: torch.device) -> str:
    return "cuda-graph" if device.type == "cuda" else "compile"


class _Buffers:
    """Everything one decode step reads and writes, allocated once per call (rows first in each per-row buffer,
    so the first ``b`` rows of a buffer are a contiguous view)."""

    def __init__(self, decoder: KVDecoder, batch: int, columns: int, max_new_tokens: int, device, dtype) -> None:
        shape = (batch, decoder.n_kv, columns, decoder.head_dim)
        # Zeros, not empty: a column a row may not see still enters its attention product times zero.
        self.caches = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in decoder.body.layers]
        self.valid = torch.zeros(batch, columns, dtype=torch.bool, device=device)  # cache columns holding a token
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # each row's newest token
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)  # its position id
        self.alive = torch.ones(batch, dtype=torch.bool, device=device)  # rows still generating
        self.rows = torch.arange(batch, device=device)  # the output row of each buffer row (batch: scratch)
        self.u = torch.zeros(batch, 1, device=device)  # the uniform draws of the next sample
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # the cache column the newest token goes to
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # the output column of the next token
        # Outputs, with one scratch row (index batch) that rows moved out of the live set write to.
        self.tokens = torch.zeros(batch + 1, max_new_tokens, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch + 1, max_new_tokens, device=device)
        self.entropy = torch.zeros(batch + 1, max_new_tokens, device=device)

    def per_row(self) -> list[torch.Tensor]:
        return [*(c for pair in self.caches for c in pair), self.valid, self.token, self.position, self.alive,
                self.rows]

    def stepped(self) -> list[torch.Tensor]:
        """What a step changes other than what it rewrites identically when replayed at the same column."""
        return [self.token, self.position, self.alive, self.col, self.t]


class GraphDecoder(KVDecoder):
    """:class:`KVDecoder`'s sampling with the decode step recorded per bucket (see the module's docstring)."""

    def __init__(self, model, *, backend: str | None = None, key_block: int = 256) -> None:
        super().__init__(model)
        device = self.body.embed_tokens.weight.device
        self.backend = backend or default_backend(device)
        if self.backend not in BACKENDS:
            raise ValueError(f"graph decode backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "cuda-graph" and device.type != "cuda":
            raise ConfigError(f"generation engine 'graph' records CUDA graphs, but the model is on {device}: "
                              "use generation_engine 'kv' (or 'graph', which compiles, on a CPU)")
        if key_block < 1:
            raise ValueError(f"key_block must be positive, got {key_block}")
        self.key_block = key_block
        self.recorded: dict[tuple[int, int], object] = {}  # (rows, key columns) -> graph or compiled step
        self.visited: list[tuple[int, int]] = []  # the (rows, key columns) buckets the last call ran, in order
        self._compiled = None
        self._pool = None  # one CUDA-graph memory pool for every bucket's graph

    # ------------------------------------------------------------------ the step
    def _step(self, buf: _Buffers, rows: int, keys: int, temperature: float, top_p: float, eos, pad: int) -> None:
        """Feed each of the first ``rows`` rows' newest token (cache column ``buf.col``), sample the next one
        into ``buf.token`` and write it, its log-prob and entropy at output column ``buf.t``; attention reads
        cache columns ``:keys``. Shapes depend only on (rows, keys), and nothing leaves the device."""
        valid, token, position, alive = buf.valid[:rows], buf.token[:rows], buf.position[:rows], buf.alive[:rows]
        valid.index_fill_(1, buf.col, True)
        x = self.body.embed_tokens(token[:, None])
        cos, sin = self.body.rotary_emb(x, position)
        key_mask = valid[:, None, None, :keys]
        for layer, (k_cache, v_cache) in zip(self.body.layers, buf.caches):
            q, k, v = self._qkv(layer, x, cos, sin)
            k_cache[:rows].index_copy_(2, buf.col, k)
            v_cache[:rows].index_copy_(2, buf.col, v)
            attended = self._decode_attention(q, k_cache[:rows, :, :keys], v_cache[:rows, :, :keys], key_mask)
            x = self._rest_of_layer(layer, x, attended)
        logits = self.model.lm_head(self.body.norm(x[:, -1]))
        new, logp, entropy = pick(logits, temperature, top_p, buf.u[:rows])
        at = (buf.rows[:rows], buf.t.expand(rows))
        buf.tokens.index_put_(at, torch.where(alive, new, pad))
        buf.logprobs.index_put_(at, torch.where(alive, logp, 0.0))
        buf.entropy.index_put_(at, torch.where(alive, entropy, 0.0))
        alive.logical_and_(~torch.isin(new, eos))
        token.copy_(new)
        position.add_(1)
        buf.col.add_(1)
        buf.t.add_(1)

    def _run(self, buf: _Buffers, rows: int, keys: int, sampling: tuple) -> None:
        if self.backend == "eager":
            self._step(buf, rows, keys, *sampling)
        elif self.backend == "compile":
            self._run_compiled(buf, rows, keys, sampling)
        else:
            graph = self.recorded.get((rows, keys))
            if graph is None:
                graph = self.recorded[(rows, keys)] = self._record(buf, rows, keys, sampling)
            graph.replay()

    def _run_compiled(self, buf: _Buffers, rows: int, keys: int, sampling: tuple) -> None:
        if self._compiled is None:
            self._compiled = torch.compile(self._step, dynamic=False, fullgraph=True)
        self.recorded.setdefault((rows, keys), self._compiled)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                self._compiled(buf, rows, keys, *sampling)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise ConfigError(
                f"generation engine 'graph' could not compile the decode step on {buf.token.device} "
                f"({type(exc.inner_exception).__name__}: {str(exc.inner_exception).splitlines()[0][:200]}); "
                "torch.compile needs a working C++ compiler on a CPU. Use generation_engine 'kv'."
            ) from exc

    def _record(self, buf: _Buffers, rows: int, keys: int, sampling: tuple) -> torch.cuda.CUDAGraph:
        """Record the step for (rows, keys) as a CUDA graph after one warm-up run on a side stream (as
        torch's CUDA-graph notes ask); the warm-up's changes are put back, so recording changes nothing."""
        before = [t.clone() for t in buf.stepped()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(buf, rows, keys, *sampling)
        torch.cuda.current_stream().wait_stream(side)
        for t, old in zip(buf.stepped(), before, strict=True):
            t.copy_(old)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(buf, rows, keys, *sampling)
        return graph

    @staticmethod
    def _move(buf: _Buffers, rows: int, to: int) -> None:
        """Move the live rows among the first ``rows`` to the front; the rest of the first ``to`` are idle
        (not alive, writing to the scratch output row)."""
        live = buf.alive[:rows].nonzero().squeeze(1)
        for t in buf.per_row():
            t[: len(live)] = t[:rows].index_select(0, live)  # a copy first, so overlapping rows are safe
        buf.alive[len(live):to] = False
        buf.rows[len(live):to] = len(buf.tokens) - 1

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_ids: list[int],
        pad_token_id: int,
        temperature: float,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`KVDecoder.generate`: ``(tokens, logprobs, entropy)``, each [batch, max_new_tokens]."""
        device = prompt_ids.device
        batch, width = prompt_ids.shape
        blocks = -(-(width + max_new_tokens) // self.key_block)
        buf = _Buffers(self, batch, blocks * self.key_block, max_new_tokens, device,
                       self.body.embed_tokens.weight.dtype)
        eos = torch.tensor(eos_token_ids, device=device)
        sampling = (temperature, top_p, eos, pad_token_id)

        # Prefill, eagerly, then the first token.
        buf.valid[:, :width] = prompt_mask.bool()
        positions = _position_ids(prompt_mask)
        logits = self._prefill(prompt_ids, prompt_mask, positions, buf.caches)
        if temperature > 0:
            buf.u.uniform_(generator=generator)
        first, logp, entropy = pick(logits, temperature, top_p, buf.u)
        buf.tokens[:batch, 0], buf.logprobs[:batch, 0], buf.entropy[:batch, 0] = first, logp, entropy
        buf.alive &= ~torch.isin(first, eos)
        buf.token.copy_(first)
        buf.position.copy_(positions[:, -1:] + 1)
        buf.col.fill_(width)
        buf.t.fill_(1)

        buckets, rows = row_buckets(batch), batch
        self.visited = []
        for t in range(1, max_new_tokens):
            preempt.check()  # a preemption drops a rollout between tokens (training/preempt.py)
            live = int(buf.alive[:rows].sum())
            if live == 0:
                break
            fits = min(b for b in buckets if b >= live)
            if fits < rows:
                self._move(buf, rows, fits)
                rows = fits
            keys = min(len(buf.valid[0]), -(-(width + t) // self.key_block) * self.key_block)
            if temperature > 0:
                buf.u[:rows].uniform_(generator=generator)
            if not self.visited or self.visited[-1] != (rows, keys):
                self.visited.append((rows, keys))
            self._run(buf, rows, keys, sampling)
        return buf.tokens[:batch], buf.logprobs[:batch], buf.entropy[:batch]
