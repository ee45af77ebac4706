from __future__ import annotations

import pytest
import torch

from slimserve.server.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax() -> None:
    logits = _logits()
    token, _ = Sampler(SamplingParams(max_tokens=1, temperature=0), 50).sample(logits)
    assert token == int(torch.argmax(logits))


def test_same_seed_same_draws_different_seed_differs() -> None:
    logits = _logits()

    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.5, seed=seed), 50)
        return [sampler.sample(logits)[0] for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_k_one_is_greedy_even_when_hot() -> None:
    logits = _logits(1)
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=2.0, top_k=1, seed=0), 50)
    assert {sampler.sample(logits)[0] for _ in range(10)} == {int(torch.argmax(logits))}


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.full((10,), -10.0)
    logits[3], logits[5] = 5.0, 4.0  # ~73% and ~27% of the mass
    sampler = Sampler(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=0), 10)
    assert {sampler.sample(logits)[0] for _ in range(30)} == {3}


def test_presence_penalty_steers_away_from_repeats() -> None:
    logits = torch.zeros(5)
    logits[2] = 1.0
    logits[4] = 0.5
    sampler = Sampler(SamplingParams(max_tokens=3, temperature=0, presence_penalty=2.0), 5)
    first, _ = sampler.sample(logits)
    second, _ = sampler.sample(logits)
    assert (first, second) == (2, 4)


def test_frequency_penalty_grows_with_count() -> None:
    logits = torch.tensor([0.0, 1.0, 0.9])
    sampler = Sampler(SamplingParams(max_tokens=4, temperature=0, frequency_penalty=0.06), 3)
    tokens = [sampler.sample(logits)[0] for _ in range(4)]
    assert tokens[:2] == [1, 1] and 2 in tokens[2:]


def test_logprobs_are_raw_model_logprobs_with_alternatives() -> None:
    logits = _logits(2)
    token, lp = Sampler(SamplingParams(max_tokens=1, temperature=0.7, logprobs=3, seed=1), 50).sample(logits)
    expected = torch.log_softmax(logits, -1)
    assert lp is not None and lp.token_id == token
    assert lp.logprob == pytest.approx(float(expected[token]), abs=1e-5)
    assert [t for t, _ in lp.top] == torch.topk(expected, 3).indices.tolist()


def test_params_validate_ranges() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(max_tokens=1, logprobs=21)


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = _logits(3)
    banned = int(torch.argmax(logits))
    token, _ = Sampler(SamplingParams(max_tokens=1, temperature=0, logit_bias={banned: -100}), 50).sample(logits)
    assert token != banned
    token, _ = Sampler(SamplingParams(max_tokens=1, temperature=1.0, logit_bias={7: 100}, seed=0), 50).sample(logits)
    assert token == 7
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler(SamplingParams(max_tokens=1, logit_bias={50: 1.0}), 50)
