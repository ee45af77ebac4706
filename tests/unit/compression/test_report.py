from __future__ import annotations

from slimserve.compression.report import pareto_front, speed_key

# two students of equal quality and size: tok/s taken minutes apart rank "b" faster, side by side "a" is
POINTS = {
    "teacher": {"perplexity": 10.0, "size_bytes": 500, "decode_tok_s_b1": 30.0, "speedup_b1": 1.0},
    "a": {"perplexity": 12.0, "size_bytes": 400, "decode_tok_s_b1": 25.0, "speedup_b1": 1.3},
    "b": {"perplexity": 12.0, "size_bytes": 400, "decode_tok_s_b1": 28.0, "speedup_b1": 1.2},
}


def test_the_front_ranks_speed_by_the_side_by_side_ratio_when_every_variant_has_one() -> None:
    assert speed_key(POINTS) == "speedup_b1"
    assert pareto_front(POINTS) == {"teacher", "a"}
    # a variant measured before side-by-side timing existed: absolute tok/s for everyone
    mixed = {**POINTS, "old": {"perplexity": 11.0, "size_bytes": 480, "decode_tok_s_b1": 20.0}}
    assert speed_key(mixed) == "decode_tok_s_b1"
    assert pareto_front(mixed) == {"teacher", "b", "old"}
