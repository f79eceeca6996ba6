"""PPO's equations (training/ppo.py) and the padded forward passes of training/experience.py.

Every check compares against values computed by hand or by a plain reference
implementation written here, never against the code under test itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from concise_rl.training import ppo
from concise_rl.training.experience import critic_forward, policy_forward, position_ids
from concise_rl.training.models import Critic


# ---------------------------------------------------------------------------- helpers
def right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def reference_gae(rewards, values, mask, gamma, lam):
    """Per sequence, over its valid tokens only; V = 0 after the last valid token."""
    batch, width = rewards.shape
    adv = torch.zeros(batch, width, dtype=torch.float64)
    ret = torch.zeros(batch, width, dtype=torch.float64)
    for b in range(batch):
        length = int(mask[b].sum().item())
        next_adv = 0.0
        for t in range(length - 1, -1, -1):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            ret[b, t] = next_adv + float(values[b, t])
    return adv, ret


# ---------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.9), (1.0, 0.0)])
def test_gae_matches_per_sequence_reference(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    width = 9
    lengths = [1, width, 4, 7, 2]  # a length-1 row and a full-width row
    mask = right_padded_mask(lengths, width)
    # Non-zero garbage on padding: it must not leak into valid tokens.
    rewards = torch.randn(len(lengths), width, generator=gen)
    values = torch.randn(len(lengths), width, generator=gen)

    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = reference_gae(rewards, values, mask, gamma, lam)

    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[mask == 0] == 0)
    assert torch.all(ret[mask == 0] == 0)


def test_gae_hand_computed():
    # gamma = 1, lam = 0.5, one response of 3 tokens (then 2 padding columns holding garbage).
    # values V = [0.5, 0.2, 0.4], rewards r = [0, 0, 1], V after the last token = 0.
    #   t=2: delta = 1 + 0   - 0.4 =  0.6;  A2 = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2 =  0.2;  A1 = 0.2 + 0.5 * 0.6 =  0.5
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3;  A0 = -0.3 + 0.5 * 0.5 = -0.05
    # returns = A + V = [-0.05 + 0.5, 0.5 + 0.2, 0.6 + 0.4] = [0.45, 0.7, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("r", [1.0, -0.5, -1.0])
def test_gae_terminal_reward_decays_with_lambda_and_mean_shrinks_with_length(r):
    gamma, lam = 1.0, 0.9
    lengths = [1, 3, 6, 12, 20]
    width = max(lengths)
    mask = right_padded_mask(lengths, width)
    values = torch.zeros(len(lengths), width)
    scores = torch.full((len(lengths),), r)
    zeros = torch.zeros(len(lengths), width)
    rewards, _ = ppo.token_rewards(scores, zeros, zeros, mask, kl_coef=0.05)  # no KL: logp == ref
    adv, _ = ppo.gae(rewards, values, mask, gamma, lam)

    means = []
    for b, T in enumerate(lengths):
        expected = torch.tensor([lam ** (T - 1 - t) * r for t in range(T)])
        torch.testing.assert_close(adv[b, :T], expected)
        means.append(adv[b, :T].mean().item())
        # closed form of the token mean: r * (1 - lam^T) / (T * (1 - lam))
        assert means[-1] == pytest.approx(r * (1 - lam**T) / (T * (1 - lam)), rel=1e-5)
    mags = [abs(m) for m in means]
    assert all(a > b for a, b in zip(mags, mags[1:])), mags
    assert mags[0] == pytest.approx(abs(r))


# ---------------------------------------------------------------------------- losses
def test_policy_loss_matrix_hand_computed():
    eps = 0.2
    # (advantage, ratio) -> loss = max(-A*ratio, -A*clip(ratio, 0.8, 1.2)), clipped = clip term larger
    cases = [
        (1.0, 1.1, -1.1, 0.0),  # A>0, inside: -1.1 both
        (1.0, 1.5, -1.2, 1.0),  # A>0, above: max(-1.5, -1.2) = -1.2, clip binds
        (1.0, 0.5, -0.5, 0.0),  # A>0, below: max(-0.5, -0.8) = -0.5, no clip
        (2.0, 1.5, -2.4, 1.0),  # A=2, above: max(-3.0, -2.4) = -2.4, clip binds
        (-1.0, 1.5, 1.5, 0.0),  # A<0, above: max(1.5, 1.2) = 1.5, no clip
        (-1.0, 0.5, 0.8, 1.0),  # A<0, below: max(0.5, 0.8) = 0.8, clip binds
        (-2.0, 0.9, 1.8, 0.0),  # A<0, inside: 1.8 both
    ]
    adv = torch.tensor([[c[0] for c in cases]])
    ratio = torch.tensor([[c[1] for c in cases]], dtype=torch.float64)
    old = torch.randn(1, len(cases), dtype=torch.float64)
    logprobs = old + torch.log(ratio)
    loss, clipped = ppo.policy_loss_matrix(logprobs.float(), old.float(), adv, eps)
    torch.testing.assert_close(loss, torch.tensor([[c[2] for c in cases]]), atol=1e-5, rtol=0)
    assert clipped.tolist() == [[c[3] for c in cases]]


def test_value_loss_matrix_hand_computed():
    eps = 0.2
    # (V, V_old, R) -> 0.5 * max((V-R)^2, (V_old + clip(V-V_old, -0.2, 0.2) - R)^2)
    cases = [
        (0.5, 0.0, 1.0, 0.32),  # clipped V = 0.2: max(0.25, 0.64) -> 0.32, clip binds
        (0.1, 0.0, 1.0, 0.405),  # inside the range: 0.5 * 0.81
        (0.5, 0.0, 0.4, 0.02),  # clipped V = 0.2: max(0.01, 0.04) -> 0.02, clip binds
        (0.5, 0.0, 0.0, 0.125),  # clipped V = 0.2: max(0.25, 0.04) -> 0.125, clip does not bind
        (-1.0, 1.0, -1.0, 1.62),  # perfect V but clipped V = 0.8: max(0, 3.24) -> 1.62
    ]
    v = torch.tensor([[c[0] for c in cases]])
    old = torch.tensor([[c[1] for c in cases]])
    ret = torch.tensor([[c[2] for c in cases]])
    loss = ppo.value_loss_matrix(v, old, ret, eps)
    torch.testing.assert_close(loss, torch.tensor([[c[3] for c in cases]]), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- aggregation
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", (1 + 2 + 4 + 5 + 6) / 5),  # 3.6
        ("seq-mean-token-mean", ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2),  # 3.25
        ("seq-mean-token-sum-norm", (3 + 15) / (2 * 4)),  # 2.25
    ],
)
def test_aggregate_hand_computed(mode, expected):
    out = ppo.aggregate(LOSS, MASK, mode, num_seqs=2, num_tokens=MASK.sum().item(), max_len=4)
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_micro_batches_sum_to_mini_batch(mode):
    gen = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 7, generator=gen)
    mask = right_padded_mask([1, 7, 3, 5, 2, 6], 7)
    kw = dict(num_seqs=6, num_tokens=mask.sum().item(), max_len=10)
    whole = ppo.aggregate(loss, mask, mode, **kw)
    pieces = sum(ppo.aggregate(loss[i : i + 2], mask[i : i + 2], mode, **kw) for i in range(0, 6, 2))
    uneven = ppo.aggregate(loss[:1], mask[:1], mode, **kw) + ppo.aggregate(loss[1:], mask[1:], mode, **kw)
    assert pieces.item() == pytest.approx(whole.item(), abs=1e-6)
    assert uneven.item() == pytest.approx(whole.item(), abs=1e-6)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        ppo.aggregate(LOSS, MASK, "seq-sum", num_seqs=2, num_tokens=5, max_len=4)


# ---------------------------------------------------------------------------- rewards & masks
def test_token_rewards_kl_on_valid_tokens_and_score_on_last():
    gen = torch.Generator().manual_seed(2)
    width, kl_coef = 5, 0.1
    lengths = [3, width, 1]
    mask = right_padded_mask(lengths, width)
    logprobs = -torch.rand(3, width, generator=gen)
    ref = -torch.rand(3, width, generator=gen)
    scores = torch.tensor([2.0, -1.0, 0.5])

    rewards, kl = ppo.token_rewards(scores, logprobs, ref, mask, kl_coef)

    expected_kl = (logprobs - ref) * mask
    expected = -kl_coef * expected_kl
    for b, T in enumerate(lengths):
        expected[b, T - 1] += scores[b]
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[mask == 0] == 0) and torch.all(kl[mask == 0] == 0)
    # The score is on index mask.sum()-1, including the full-width row's last column.
    assert rewards[1, width - 1].item() == pytest.approx(-1.0 - kl_coef * (logprobs[1, 4] - ref[1, 4]).item())
    assert rewards[2, 0].item() == pytest.approx(0.5 - kl_coef * (logprobs[2, 0] - ref[2, 0]).item())


def test_token_rewards_empty_response_gets_no_score():
    mask = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    zeros = torch.zeros(2, 3)
    rewards, _ = ppo.token_rewards(torch.tensor([1.0, 1.0]), zeros, zeros, mask, kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_response_mask_first_eos_inclusive():
    eos = [7, 9]
    ids = torch.tensor(
        [
            [1, 2, 7, 3, 7],  # first EOS (7) at 2
            [9, 5, 7, 2, 2],  # first EOS (9) at 0
            [1, 2, 3, 4, 5],  # no EOS: all ones
            [4, 5, 6, 8, 9],  # EOS in the last column
            [1, 9, 2, 7, 9],  # second id first
        ]
    )
    assert ppo.response_mask(ids, eos).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]


def test_masked_whiten():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=gen) * 3 + 2
    mask = right_padded_mask([6, 2, 4, 1], 6)
    w = ppo.masked_whiten(x, mask)
    valid = x[mask.bool()]
    expected = (valid - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(w[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(w[mask == 0] == 0)
    assert w[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[mask.bool()].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_masked_whiten_without_the_mean_shift_keeps_every_sign():
    # All-positive advantages (every response solved, lambda < 1): whitening would make
    # the smallest of them negative; scaling only must not.
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(4, 6, generator=gen) + 0.01
    mask = right_padded_mask([6, 2, 4, 1], 6)
    s = ppo.masked_whiten(x, mask, shift_mean=False)
    valid = x[mask.bool()]
    torch.testing.assert_close(s[mask.bool()], valid / valid.std(unbiased=False), atol=1e-5, rtol=1e-5)
    assert torch.all(s[mask.bool()] > 0)
    assert torch.all(s[mask == 0] == 0)
    assert (ppo.masked_whiten(x, mask)[mask.bool()] < 0).any()


def test_explained_variance():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])  # the padded 50 must be ignored
    assert ppo.explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # A constant critic at the mean return (2) explains nothing.
    assert ppo.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    # Residual [0, 0, 1]: var 1/3 - 1/9 = 2/9; Var(R) = 2/3 -> 1 - (2/9)/(2/3) = 2/3.
    values = torch.tensor([[1.0, 2.0, 2.0, -7.0]])
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(2 / 3, abs=1e-6)
    assert math.isnan(ppo.explained_variance(values, torch.ones_like(returns), mask))


# ---------------------------------------------------------------------------- padded forward passes
@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def tiny_lm(request):
    """A tiny random causal LM and its transformer body (what Critic wraps).

    Qwen2 uses rotary positions, which only see relative offsets, so a uniform shift
    from left padding is harmless there; GPT-2 learns absolute position embeddings,
    so it gives the same log-probs padded and unpadded only if ``position_ids`` skip
    the padding.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if request.param == "qwen2":
        cfg = Qwen2Config(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
        model = Qwen2ForCausalLM(cfg).eval()
        return model, model.model
    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval()
    return model, model.transformer


PAD = 0
PROMPT_A = [3, 4, 5]
PROMPT_B = [11, 12, 13, 14, 15]  # two tokens longer than A
RESP_A = [6, 7, 8, 9]
RESP_B = [21, 22, 23, 24]
TEMP = 0.7


def left_padded_batch(prompts, responses, extra_pad=0):
    width = max(len(p) for p in prompts) + extra_pad
    ids, att = [], []
    for p, r in zip(prompts, responses):
        pad = width - len(p)
        ids.append([PAD] * pad + p + r)
        att.append([0] * pad + [1] * (len(p) + len(r)))
    return torch.tensor(ids), torch.tensor(att)


def test_position_ids_skip_left_padding():
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(att).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def direct_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / TEMP, dim=-1)
    return logp[torch.arange(len(response)), torch.tensor(response)]


def test_policy_forward_is_invariant_to_left_padding(tiny_lm):
    model, _ = tiny_lm
    R = len(RESP_A)
    tokens = torch.tensor([RESP_A, RESP_B])
    with torch.no_grad():
        ids, att = left_padded_batch([PROMPT_A, PROMPT_B], [RESP_A, RESP_B])
        lp, logits = policy_forward(model, ids, att, R, TEMP, tokens)
        ids3, att3 = left_padded_batch([PROMPT_A, PROMPT_B], [RESP_A, RESP_B], extra_pad=3)
        lp3, _ = policy_forward(model, ids3, att3, R, TEMP, tokens)
        ids_a, att_a = left_padded_batch([PROMPT_A], [RESP_A])  # A alone: no padding at all
        lp_a, _ = policy_forward(model, ids_a, att_a, R, TEMP, tokens[:1])
    assert lp.shape == (2, R) and logits.shape == (2, R, 50)
    torch.testing.assert_close(lp, lp3, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[0], lp_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[0], direct_logprobs(model, PROMPT_A, RESP_A), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[1], direct_logprobs(model, PROMPT_B, RESP_B), atol=1e-5, rtol=0)


def test_critic_forward_is_invariant_to_left_padding(tiny_lm):
    model, backbone = tiny_lm
    torch.manual_seed(1)
    critic = Critic(backbone, 32).eval()
    R = len(RESP_A)
    with torch.no_grad():
        ids, att = left_padded_batch([PROMPT_A, PROMPT_B], [RESP_A, RESP_B])
        v = critic_forward(critic, ids, att, R)
        ids3, att3 = left_padded_batch([PROMPT_A, PROMPT_B], [RESP_A, RESP_B], extra_pad=3)
        v3 = critic_forward(critic, ids3, att3, R)
        direct = []
        for p, r in ((PROMPT_A, RESP_A), (PROMPT_B, RESP_B)):
            hidden = backbone(input_ids=torch.tensor([p + r])).last_hidden_state
            # V(s_t) of response token t is read at the position before it: len(p)-1 .. len(p)+R-2
            direct.append(critic.value_head(hidden).squeeze(-1)[0, len(p) - 1 : -1])
    assert v.shape == (2, R)
    torch.testing.assert_close(v, v3, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, torch.stack(direct), atol=1e-5, rtol=0)
    assert not torch.allclose(v[0], v[0, :1].expand(R))  # values really vary per token
