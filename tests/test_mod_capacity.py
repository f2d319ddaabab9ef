"""MoD's capacity cannot be misread: a float or Fraction is the share of each sequence's tokens
(1.0: every token), an int >= 2 a token count, and a bare int 1, which reads as "capacity 1" (every
token) but would count one token, is refused with a message saying to write 1.0."""

from fractions import Fraction

import pytest
import torch

from mixops.nn import MoD, TokenCount, pmod_capacity_schedule
from mixops.nn.mod_select import parse_capacity
from mixops.reference.decoder import DecoderBlock

H, HEADS, FFN = 16, 2, 24


def _mod(capacity, **kw):
    torch.manual_seed(0)
    m = MoD(DecoderBlock(H, HEADS, FFN), capacity=capacity, **kw)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.5)
    return m


def _chosen_per_sequence(m, B=2, S=10):
    m(torch.randn(B, S, H))
    return m.chosen.sum(1).tolist()


def test_int_one_is_refused_and_the_message_says_to_write_one_point_zero():
    with pytest.raises(ValueError, match=r"capacity=1 is ambiguous.*capacity=1\.0"):
        _mod(1)
    with pytest.raises(ValueError, match=r"capacity=1 is ambiguous"):
        parse_capacity(1)


@pytest.mark.parametrize("capacity", [1.0, Fraction(1), Fraction(2, 2)])
def test_ratio_one_processes_every_token(capacity):
    assert _chosen_per_sequence(_mod(capacity)) == [10, 10]


@pytest.mark.parametrize("capacity, want", [(2, 2), (3, 3), (25, 10), (0.5, 5), (0.25, 3)])
def test_ints_from_two_count_tokens_and_floats_are_ratios(capacity, want):
    assert _chosen_per_sequence(_mod(capacity)) == [want, want]


@pytest.mark.parametrize("capacity, match", [(0, "must be >= 2"), (-2, "must be >= 2")])
def test_other_small_ints_name_the_count_rule(capacity, match):
    with pytest.raises(ValueError, match=match):
        _mod(capacity)


def test_the_schedule_gives_ratios_even_from_int_bounds():
    # min_ratio=1 is a ratio (every token), not a count of one token.
    s = pmod_capacity_schedule(4, min_ratio=1, max_ratio=1)
    assert s == [Fraction(1)] * 4 and all(isinstance(c, Fraction) for c in s)
    assert _chosen_per_sequence(_mod(s[-1])) == [10, 10]


def test_a_tiny_fraction_stays_positive():
    # An exact Fraction is kept (no rounding to 0): C = ceil(S * 1e-7) = 1 token.
    assert parse_capacity(Fraction(1, 10**7)) == Fraction(1, 10**7)
    assert _chosen_per_sequence(_mod(Fraction(1, 10**7))) == [1, 1]


def test_recorded_options_round_trip_without_the_trap():
    # mod_options (what add_mod records in config.mixops_mod): ratios as strings, counts as ints.
    full = _mod(1.0).mod_options()["capacity"]
    count = _mod(3).mod_options()["capacity"]
    assert full == "1" and count == 3
    assert _chosen_per_sequence(_mod(Fraction(full))) == [10, 10]


def test_token_count_one_keeps_one_token_and_the_message_names_it():
    assert _chosen_per_sequence(_mod(TokenCount(1))) == [1, 1]
    assert _chosen_per_sequence(_mod(TokenCount(3))) == [3, 3]
    with pytest.raises(ValueError, match=r"TokenCount\(1\) for one token"):
        _mod(1)
    with pytest.raises(ValueError, match="TokenCount capacity must be >= 1"):
        _mod(TokenCount(0))
