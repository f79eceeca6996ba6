"""A sampling loop over a preallocated KV cache, for Llama-family decoders (Qwen2, Llama, Mistral).

Plain ``model.generate`` pays a large fixed cost per generated token: logits
processors, stopping criteria, a dynamic cache that grows by concatenation, mask
construction and the model's generic forward wrappers. For the small models of the
embedded default that overhead is most of a rollout, and on a GPU it keeps
generation far below the memory-bandwidth ceiling (see GPU_BASELINE.md). This
decoder runs the model's own modules (embedding, norms, projections, rotary
embedding, MLP, LM head: so it always uses the current weights and needs no copy)
with:

- one KV buffer per layer, allocated once per batch and written in place;
- sampling on the device (temperature, nucleus), with the log-probability and
  entropy of every sampled token taken from the same logits, so a PPO rollout
  needs no separate forward for its old log-probs;
- rows that reach EOS dropped from the batch (the cache is compacted once a quarter
  of the rows have finished), so finished rows stop costing.

transformers' static-cache ``generate`` path (``cache_implementation="static"``) fixes
the cache growth but still runs generate's per-token machinery and keeps finished
rows in the batch, which is why this is written here rather than taken from it (we
did not time that path; bench/rollout.py times plain ``generate``).
Models outside the supported family fall back to ``model.generate``
(``supports`` says which).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from concise_rl.training import preempt

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral")


def supports(model) -> bool:
    """Whether ``model`` has the layout this decoder runs (and no feature it ignores)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False  # sliding-window layers
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window):
        return False
    body = getattr(model, "model", None)
    return body is not None and hasattr(body, "rotary_emb") and hasattr(body, "layers")


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask logits outside the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Keep a token if the mass before it is below top_p (the top token is always kept).
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the CDF at ``u`` [rows, 1], uniform on [0, 1): same distribution as
    ``torch.multinomial``, a fraction of its cost on a CPU (one uniform draw per row instead of one per
    vocabulary entry)."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def pick(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None):
    """The next token of each row from its ``logits`` [rows, vocab], with its log-probability and the
    entropy of the distribution it was drawn from (temperature-scaled, before nucleus filtering;
    temperature 1 when greedy), in float32. ``u`` [rows, 1]: the uniform draws (unused when greedy);
    the caller draws them, so this function holds no random state (graph_decode.py records it)."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    logp = scaled.log_softmax(-1)
    p = logp.exp()  # one softmax serves sampling (without top-p) and the entropy
    if temperature > 0:
        token = _sample(_nucleus(scaled, top_p).softmax(-1) if top_p < 1.0 else p, u)
    else:
        token = scaled.argmax(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1), -(p * logp).sum(-1)


class KVDecoder:
    """Batched sampling from a Llama-family causal LM with a preallocated KV cache."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError(
                f"KVDecoder supports model types {SUPPORTED_MODEL_TYPES} with full attention; got "
                f"{getattr(model.config, 'model_type', type(model).__name__)!r}. Use generation engine 'hf'."
            )
        self.model = model
        self.body = model.model
        self.rope = sys.modules[type(self.body.layers[0].self_attn).__module__].apply_rotary_pos_emb
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.n_heads = model.config.num_attention_heads
        self.n_kv = model.config.num_key_value_heads

    # ------------------------------------------------------------------ forward
    def _layers(self, x, cos, sin, caches, start: int, key_mask: torch.Tensor):
        """Run every layer on ``x`` [rows, new, hidden] whose keys go to cache columns ``start:``.

        ``key_mask`` [rows, 1, new, start + new] says which cached keys each new query may see.
        """
        new = x.shape[1]
        end = start + new
        for layer, (k_cache, v_cache) in zip(self.body.layers, caches):
            q, k, v = self._qkv(layer, x, cos, sin)
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            if new == 1:
                out = self._decode_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], key_mask)
            else:
                out = F.scaled_dot_product_attention(
                    q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=key_mask, scale=self.scaling,
                    enable_gqa=self.n_heads != self.n_kv,
                )
            x = self._rest_of_layer(layer, x, out)
        return self.model.lm_head(self.body.norm(x[:, -1]))  # [rows, vocab]

    def _qkv(self, layer, x, cos, sin):
        """A layer's queries, keys and values of ``x`` [rows, new, hidden], rotated: [rows, heads, new, dim]."""
        rows, new, _ = x.shape
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(rows, new, self.n_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(rows, new, self.n_kv, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(rows, new, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        return q, k, v

    def _rest_of_layer(self, layer, x, attended):
        """The layer's output projection, residuals and MLP, given its attention output [rows, heads, new, dim]."""
        rows, new, _ = x.shape
        x = x + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(rows, new, -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _decode_attention(self, q, k, v, key_mask):
        """Attention of one query per row, grouped-query without repeating K/V.

        On a CPU two batched matmuls took about 0.6x the time of the fused SDPA kernel for a
        single query in our profile (the demo model, 64 rows); prefill still uses SDPA.
        """
        rows, _, _, dim = q.shape
        q = q.view(rows, self.n_kv, self.n_heads // self.n_kv, dim)  # heads of a KV group share its K/V
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling  # [rows, n_kv, group, keys]
        scores = scores.masked_fill(~key_mask, float("-inf"))
        out = torch.matmul(scores.softmax(-1), v)  # [rows, n_kv, group, dim]
        return out.view(rows, self.n_heads, 1, dim)

    def _prefill(self, prompt_ids, prompt_mask, positions, caches) -> torch.Tensor:
        """Causal attention over the left-padded prompts, their keys and values into cache columns
        ``:width``; the logits of each row's next token. A padding query sees itself, so softmax stays finite."""
        width = prompt_ids.shape[1]
        device = prompt_ids.device
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = (causal & prompt_mask.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
        x = self.body.embed_tokens(prompt_ids)
        cos, sin = self.body.rotary_emb(x, positions)
        return self._layers(x, cos, sin, caches, 0, mask[:, None])

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
        """Sample up to ``max_new_tokens`` per left-padded prompt (greedy at temperature 0).

        Returns ``(tokens, logprobs, entropy)``, each [batch, max_new_tokens] on the
        prompts' device: tokens right-padded with ``pad_token_id`` after EOS; the
        log-probability and entropy of the distribution each token was drawn from
        (logits divided by the temperature, before nucleus filtering; temperature 1
        when greedy), zero after EOS.
        """
        device = prompt_ids.device
        batch, width = prompt_ids.shape
        total = width + max_new_tokens
        dtype = self.body.embed_tokens.weight.dtype
        caches = [
            (torch.empty(batch, self.n_kv, total, self.head_dim, device=device, dtype=dtype),
             torch.empty(batch, self.n_kv, total, self.head_dim, device=device, dtype=dtype))
            for _ in self.body.layers
        ]
        # Which cache columns hold a real token, per row: the prompt mask, then every generated token.
        valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
        valid[:, :width] = prompt_mask.bool()
        positions = _position_ids(prompt_mask)

        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(batch, max_new_tokens, device=device)
        entropy = torch.zeros(batch, max_new_tokens, device=device)
        eos = torch.tensor(eos_token_ids, device=device)
        rows = torch.arange(batch, device=device)  # output row of each cache row
        alive = torch.ones(batch, dtype=torch.bool, device=device)  # cache rows still generating

        logits = self._prefill(prompt_ids, prompt_mask, positions, caches)
        next_pos = positions[:, -1:] + 1  # [rows, 1]

        for t in range(max_new_tokens):
            preempt.check()  # a preemption drops a rollout between tokens (training/preempt.py)
            u = (torch.rand(len(logits), 1, generator=generator, device=device, dtype=torch.float32)
                 if temperature > 0 else None)
            token, token_logp, token_entropy = pick(logits, temperature, top_p, u)
            out = rows[alive]
            tokens[out, t] = token[alive]
            logprobs[out, t] = token_logp[alive]
            entropy[out, t] = token_entropy[alive]
            alive = alive & ~torch.isin(token, eos)
            live = int(alive.sum())
            if live == 0 or t == max_new_tokens - 1:
                break
            if (len(alive) - live) * 4 >= len(alive):
                # Compact: finished rows leave the cache, so they stop costing.
                idx = alive.nonzero().squeeze(1)
                caches = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in caches]
                valid, rows, token, next_pos = valid[idx], rows[idx], token[idx], next_pos[idx]
                alive = alive[idx]
            col = width + t
            valid[:, col] = True
            x = self.body.embed_tokens(token[:, None])
            cos, sin = self.body.rotary_emb(x, next_pos)
            logits = self._layers(x, cos, sin, caches, col, valid[:, None, None, : col + 1])
            next_pos = next_pos + 1
        return tokens, logprobs, entropy
