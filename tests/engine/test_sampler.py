import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from pipecat_orpheus import format as fmt
from pipecat_orpheus.engine.sampler import (
    EOS_ROW,
    N_HEAD_ROWS,
    SamplingRows,
    apply_repetition_penalty,
    apply_top_p,
    gumbel_noise,
    head_token_ids,
    sample,
)
from pipecat_orpheus.noise import noise_key


def rows(b, *, temperature=0.6, top_p=0.8, penalty=1.1, gen=None, step=None, keys=None, min_tokens=0):
    def full(v, dtype):
        return torch.full((b,), v, dtype=dtype)

    return SamplingRows(
        temperature=full(temperature, torch.float32) if not torch.is_tensor(temperature) else temperature,
        top_p=full(top_p, torch.float32),
        repetition_penalty=full(penalty, torch.float32),
        noise_key=keys if keys is not None else torch.arange(b, dtype=torch.int64) * 7919,
        noise_step=step if step is not None else torch.zeros(b, dtype=torch.int64),
        num_generated=gen if gen is not None else torch.zeros(b, dtype=torch.int64),
        min_tokens=full(min_tokens, torch.int64),
    )


def test_head_rows_are_audio_then_end_of_speech():
    """The head rows are the 28672 audio ids in order, then END_OF_SPEECH."""
    ids = head_token_ids()
    assert ids.shape == (N_HEAD_ROWS,)
    assert ids[0] == fmt.AUDIO_TOKEN_OFFSET and ids[-2] == fmt.AUDIO_TOKEN_END - 1 and ids[EOS_ROW] == fmt.END_OF_SPEECH


def test_samples_respect_frame_position_and_stop_rules():
    """Every sampled token belongs to its row's frame position; END_OF_SPEECH only at frame starts after min_tokens."""
    torch.manual_seed(0)
    b = 64
    gen = torch.arange(b, dtype=torch.int64)
    logits = torch.randn(b, N_HEAD_ROWS)
    logits[:, EOS_ROW] = 50.0  # END_OF_SPEECH would win wherever it is allowed
    for temperature in (0.0, 1.0):
        out = sample(
            logits,
            torch.zeros(b, N_HEAD_ROWS, dtype=torch.bool),
            rows(b, temperature=temperature, gen=gen, min_tokens=14),
        )
        for g, token in zip(gen.tolist(), out.token_ids.tolist(), strict=False):
            if g % 7 == 0 and g >= 14:
                assert token == fmt.END_OF_SPEECH
            else:
                start, end = fmt.allowed_token_range(g % 7)
                assert start <= token < end
        assert torch.equal(head_token_ids()[out.head_rows], out.token_ids)


def test_repetition_penalty_matches_transformers():
    """The per-row penalty equals transformers' RepetitionPenaltyLogitsProcessor over the same generated ids."""
    torch.manual_seed(1)
    scores = torch.randn(3, 500)
    ids = torch.randint(0, 500, (3, 40))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter(1, ids, True)
    penalties = torch.tensor([1.1, 1.5, 1.0])
    ours = apply_repetition_penalty(scores, seen, penalties)
    for i, p in enumerate(penalties.tolist()):
        ref = RepetitionPenaltyLogitsProcessor(p)(ids[i : i + 1], scores[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=0, atol=0)


def test_top_p_matches_transformers():
    """The per-row nucleus equals transformers' TopPLogitsWarper for each row's top_p."""
    torch.manual_seed(2)
    scores = torch.randn(4, 4097) * 3
    top_p = torch.tensor([0.8, 0.9, 0.3, 1.0])
    ours = apply_top_p(scores, top_p)
    for i, p in enumerate(top_p.tolist()):
        ref = TopPLogitsWarper(p)(None, scores[i : i + 1].clone()) if p < 1 else scores[i : i + 1]
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(ref))
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[i : i + 1][kept], ref[kept])


def test_greedy_rows_take_argmax_after_penalty():
    """A greedy row picks the best allowed token after the repetition penalty, whatever the other rows do."""
    logits = torch.zeros(2, N_HEAD_ROWS)
    logits[:, 10] = 2.0  # best at frame position 0 ...
    logits[:, 11] = 1.9  # ... unless 10 was already generated
    seen = torch.zeros(2, N_HEAD_ROWS, dtype=torch.bool)
    seen[1, 10] = True
    temperature = torch.tensor([0.0, 0.0])
    out = sample(logits, seen, rows(2, temperature=temperature, penalty=1.1))
    assert out.head_rows.tolist() == [10, 11]


def test_seeded_sampling_is_independent_of_batch_composition():
    """A row's draw depends only on its logits, key and step, not on its batch position or neighbours."""
    torch.manual_seed(3)
    logits = torch.randn(4, N_HEAD_ROWS)
    seen = torch.zeros(4, N_HEAD_ROWS, dtype=torch.bool)
    keys = torch.tensor([noise_key(s) for s in (1, 2, 3, 4)])
    step = torch.tensor([5, 9, 0, 2])
    full = sample(logits, seen, rows(4, temperature=1.0, top_p=1.0, keys=keys, step=step)).token_ids
    perm = torch.tensor([2, 0, 3])
    part = sample(logits[perm], seen[perm], rows(3, temperature=1.0, top_p=1.0, keys=keys[perm], step=step[perm]))
    assert torch.equal(part.token_ids, full[perm])
    other = sample(logits, seen, rows(4, temperature=1.0, top_p=1.0, keys=keys, step=step + 1)).token_ids
    assert not torch.equal(other, full)


def test_draws_follow_the_softmax_distribution():
    """Gumbel-max draws over many steps match the tempered softmax probabilities."""
    n = 1500
    logits = torch.full((n, N_HEAD_ROWS), -30.0)
    logits[:, :3] = torch.tensor([1.0, 0.0, -1.0])
    probs = torch.softmax(torch.tensor([1.0, 0.0, -1.0]) / 0.7, dim=0)
    out = sample(
        logits,
        torch.zeros(n, N_HEAD_ROWS, dtype=torch.bool),
        rows(n, temperature=0.7, top_p=1.0, penalty=1.0, keys=torch.full((n,), noise_key(42)), step=torch.arange(n)),
    )
    freq = torch.bincount(out.head_rows, minlength=3)[:3].float() / n
    torch.testing.assert_close(freq, probs, atol=0.05, rtol=0)


def test_noise_is_pinned_to_its_published_values():
    """Noise keys and Gumbel noise keep their values (a change would alter every seeded request's tokens)."""
    assert [noise_key(s) for s in (0, 42, 2**40 + 7)] == [0, 1612446537, 2730658764]
    g = gumbel_noise(torch.tensor([noise_key(42)]), torch.tensor([3]), 4097)  # (1, 4097)
    assert g[0, :3].tolist() == [-0.2517005205154419, 1.459502935409546, 0.7430559992790222]
    assert abs(float(g.sum()) - 2157.260986328125) < 1e-3
