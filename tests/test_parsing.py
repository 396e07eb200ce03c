"""The one comma-list parser: blanks dropped, items converted, bad items named in a UserError."""

import pytest

from mixbits.errors import UserError
from mixbits.parsing import (
    group_size, parse_floats, parse_group_sizes, parse_ints, parse_list, parse_names, parse_range, split_list,
)


def test_split_list_strips_and_drops_blanks():
    assert split_list(" w2g128, w3g128,,") == ("w2g128", "w3g128")
    assert split_list("") == ()


def test_items_are_converted_and_a_bad_one_is_named():
    assert parse_ints("2, 3,4") == (2, 3, 4)
    assert parse_floats("0.5,1e-2", field="--head-l2") == (0.5, 0.01)
    with pytest.raises(UserError, match=r"--bits '2,x': 'x' is not an integer; write e.g. 2,3,4"):
        parse_ints("2,x")
    with pytest.raises(UserError, match=r"--lr '1,a': 'a' is not a number"):
        parse_list("1,a", float, field="--lr", what="a number")


def test_group_sizes_know_per_channel():
    assert parse_group_sizes("64, PC,none,-1,128") == (64, None, None, None, 128)
    assert group_size("32") == 32
    with pytest.raises(UserError, match=r"--group-sizes '64,g': 'g' is not a group size"):
        parse_group_sizes("64,g")


def test_names_and_all():
    assert parse_names("all", ("optimal", "greedy")) == ("optimal", "greedy")
    assert parse_names("greedy, optimal", ("optimal", "greedy")) == ("greedy", "optimal")
    assert parse_names("all") == ("all",)  # without a list of every name, "all" is just a name


def test_parse_range():
    assert parse_range("2.5:3.5:0.25") == (2.5, 2.75, 3.0, 3.25, 3.5)
    assert parse_range("3,4.25") == (3.0, 4.25)
    with pytest.raises(UserError, match="must look like"):
        parse_range("a:b")
    with pytest.raises(UserError, match="step > 0"):
        parse_range("2:4:0")
    with pytest.raises(UserError, match="'x' is not a number"):
        parse_range("3,x")
