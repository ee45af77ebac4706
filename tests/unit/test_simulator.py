"""The simulator: the real scheduler and router on a virtual clock, deterministic by seed."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.models.manifest import VariantManifest
from slimserve.server.profile import CostProfile
from slimserve.server.scheduler import PREFILL_TOKENS
from slimserve.server.simulator import (
    POLICIES,
    Result,
    Variant,
    Workload,
    arrivals,
    goodput,
    load_profiles,
    save_profiles,
    simulate,
)


def _variant(name: str, step_ms: float, ppl_ratio: float) -> Variant:
    profile = CostProfile(20, step_ms / 25, step_b1_ms=step_ms, step_b8_ms=2.5 * step_ms, load_ms=0)
    return Variant(name, profile, ppl_ratio)


FAMILY = [_variant("teacher", 80, 1.0), _variant("int8", 45, 1.01), _variant("int4", 30, 1.09)]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_seed_gives_the_same_numbers_to_the_last_digit(policy: str) -> None:
    workload = Workload(rate_per_s=0.8, count=60, cv=2.0, slo_scale=3.0, seed=7)
    first, again = simulate(FAMILY, workload, policy), simulate(FAMILY, workload, policy)
    assert first.latencies_ms == again.latencies_ms and first.served == again.served
    assert first.routed == again.routed and sorted(set(first.routed)) == sorted(first.served)
    assert (first.met, first.mean_quality) == (again.met, again.mean_quality)
    assert len(first.latencies_ms) == 60  # every request finished
    other = simulate(FAMILY, Workload(rate_per_s=0.8, count=60, cv=2.0, slo_scale=3.0, seed=8), policy)
    assert other.latencies_ms != first.latencies_ms


def test_workloads_are_seeded_with_budgets_a_scale_of_the_best_unloaded_latency() -> None:
    workload = Workload(rate_per_s=2.0, count=400, cv=1.0, slo_scale=4.0, seed=3)
    requests = arrivals(workload, FAMILY)
    assert requests == arrivals(workload, FAMILY)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(requests)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.15)  # 2 per second
    first = requests[0]
    int4 = FAMILY[2].profile
    best = int4.ttft_ms(first.prompt_tokens) + (first.output_tokens - 1) * int4.step_ms(1)
    assert first.budget_ms == pytest.approx(4.0 * best)
    bursty = arrivals(Workload(rate_per_s=2.0, count=400, cv=3.0, seed=3), FAMILY)
    bursty_gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(bursty)]
    assert max(bursty_gaps) > max(gaps)


def test_alone_at_low_load_a_request_takes_its_unloaded_latency() -> None:
    """One request at a time, on one variant: its prefill (in chunks of `PREFILL_TOKENS`) and its steps at
    batch one, nothing more, when turns cost exactly their profile's figures."""
    workload = Workload(
        rate_per_s=0.01, count=5, slo_scale=1.001, prompt_tokens=(200, 200), output_tokens=(10, 10), jitter=0.0
    )
    result = simulate([FAMILY[2]], workload, "fastest")
    profile = FAMILY[2].profile
    assert PREFILL_TOKENS < 200  # two chunks, each its share of the TTFT
    expected = profile.ttft_ms(200) + 9 * profile.step_ms(1)
    assert result.latencies_ms == pytest.approx([expected] * 5)
    assert result.attainment == 1.0 and result.served == {"int4": 5}


def test_a_slow_phase_of_the_host_stretches_the_turns_it_covers() -> None:
    """`host_speed` replays a live run's phases: turns in the slow stretch cost twice their profile's figure, and
    the router, which learns from what turns cost, sees them as the server's did."""
    workload = Workload(
        rate_per_s=0.01, count=5, slo_scale=1.001, prompt_tokens=(200, 200), output_tokens=(10, 10), jitter=0.0
    )
    steady = simulate([FAMILY[2]], workload, "fastest").latencies_ms
    first = arrivals(workload, FAMILY[2:])[0].at_s
    ends = first + 2 * steady[0] / 1000  # the slow phase covers the first request's turns, no later ones
    slow = simulate([FAMILY[2]], workload, "fastest", host_speed=lambda at: 2.0 if at < ends else 1.0)
    assert slow.latencies_ms[0] == pytest.approx(2 * steady[0])
    assert slow.latencies_ms[1:] == pytest.approx(steady[1:])


def test_jitter_varies_each_turn_around_the_profile_and_the_live_profile_learns_it() -> None:
    workload = Workload(rate_per_s=0.01, count=40, prompt_tokens=(64, 64), output_tokens=(20, 20), jitter=0.3)
    latencies = simulate([FAMILY[2]], workload, "fastest").latencies_ms
    profile = FAMILY[2].profile
    exact = profile.ttft_ms(64) + 19 * profile.step_ms(1)
    assert len(set(latencies)) == 40 and min(latencies) < exact < max(latencies)
    assert sum(latencies) / 40 == pytest.approx(exact, rel=0.05)  # mean-one noise
    assert profile.observations == 0  # the variant's own profile is the truth; the engine's copy learns


def test_policies_differ_where_they_should() -> None:
    workload = Workload(rate_per_s=0.3, count=60, slo_scale=3.0, seed=1)
    teacher = simulate(FAMILY, workload, "teacher")
    fastest = simulate(FAMILY, workload, "fastest")
    assert teacher.mean_quality == 1.0 and teacher.served == {"teacher": 60}
    assert fastest.mean_quality == pytest.approx(1.09) and fastest.attainment > teacher.attainment
    routed = simulate(FAMILY, workload, "router")
    assert sum(routed.served.values()) == 60 and len(routed.served) > 1
    # between the two: most budgets met (50 of 60, the teacher 14) at a quality near the teacher's
    assert routed.attainment >= 0.8 and routed.mean_quality <= 1.02


def test_goodput_is_the_highest_rate_up_to_which_the_target_held() -> None:
    def result(met: int) -> Result:
        return Result("p", 100, met, 1.0)

    assert goodput({0.1: result(99), 0.2: result(96), 0.4: result(90), 0.8: result(97)}) == 0.2
    assert goodput({0.1: result(50)}) == 0.0


def _register(home: Path, name: str, metrics: dict[str, float]) -> None:
    """A registered variant with a manifest alone: the simulator reads nothing else."""
    directory = home / "variants" / name
    directory.mkdir(parents=True)
    manifest = VariantManifest(
        name, base_model=name, method="none", bits=32, parameters=10**6, size_bytes=4 * 10**6, dtype="float32"
    )
    manifest.metrics = metrics
    manifest.write(directory)


def test_simulate_verb_prints_the_grid_from_profiled_manifests_the_same_each_time(
    slimserve_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, tok_s, ppl in (("teacher", 12.5, 10.0), ("int4", 33.0, 10.9)):
        profiled = {"ttft_ms_128": 8000 / tok_s, "decode_tok_s_b1": tok_s, "decode_tok_s_b8": 3 * tok_s}
        _register(slimserve_home, name, {**profiled, "perplexity": ppl})
    out = tmp_path / "cells.json"
    argv = ["simulate", "--variant", "teacher", "--variant", "int4", "--rates", "0.2", "0.6", "--slo-scales", "3"]
    argv += ["--cvs", "2", "--count", "20", "--seeds", "0", "1", "--policies", "router", "fastest", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "int4 (ppl x1.090)" in printed and "| cv | SLO scale | rate/s | router | fastest |" in printed
    assert "| 2 | 3 | 0.6 | " in printed and "goodput at 95% attainment" in printed
    cells = json.loads(out.read_text())
    assert [(c["policy"], c["rate"]) for c in cells] == [
        ("router", 0.2),
        ("fastest", 0.2),
        ("router", 0.6),
        ("fastest", 0.6),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == printed


def test_simulate_refuses_a_variant_without_a_measured_profile(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _register(slimserve_home, "unprofiled", {"perplexity": 10.0})
    assert main(["simulate", "--variant", "unprofiled"]) == 2
    assert "run `slimserve profile unprofiled` first" in capsys.readouterr().err


def test_a_grid_with_a_bad_value_names_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--variant", "teacher", "--rates", "0.2", "0"]) == 2
    assert "--rates must be positive" in capsys.readouterr().err


def test_simulate_takes_its_grid_from_a_config_file(
    slimserve_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, tok_s in (("teacher", 12.5), ("int4", 33.0)):
        _register(slimserve_home, name, {"ttft_ms_128": 600.0, "decode_tok_s_b1": tok_s, "decode_tok_s_b8": 3 * tok_s})
    config = tmp_path / "grid.yaml"
    config.write_text(
        "variants: [teacher, int4]\nrates: [0.4]\nslo-scales: [4]\ncvs: [1]\ncount: 10\npolicies: [fcfs]\n"
    )
    assert main(["simulate", "--config", str(config), "--count", "12"]) == 0
    printed = capsys.readouterr().out
    assert "| cv | SLO scale | rate/s | fcfs |" in printed and "| 1 | 4 | 0.4 | " in printed


def test_saved_profiles_serve_the_same_numbers_as_the_variants_they_came_from(tmp_path: Path) -> None:
    """A section's figures must stay reproducible after the manifests are profiled again: the profiles it
    served on are saved, and serving on the saved copy gives the same result to the last digit."""
    measured = dataclasses.replace(
        FAMILY[0], profile=dataclasses.replace(FAMILY[0].profile, step_points=((1, 40.0), (8, 52.0), (16, 70.0)))
    )
    family = [measured, *FAMILY[1:]]
    path = tmp_path / "profiles" / "simulate.json"
    save_profiles(family, "a test machine", path)
    loaded, measured_on = load_profiles(path)
    assert measured_on == "a test machine" and loaded == family
    workload = Workload(rate_per_s=0.8, count=40, cv=2.0, slo_scale=3.0, seed=1)
    assert simulate(loaded, workload, "router").latencies_ms == simulate(family, workload, "router").latencies_ms
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a profiles file"):
        load_profiles(path)
