"""Every numeric range of the command line at its boundaries: each end, and one step past it.

The ranges are read from the parsers themselves: every argument of every `lococo` command whose type is
one of ``argtypes``' range factories (``int_at_least``, ``odd_int``, ``real``) is parsed at its low and
high ends (accepted, unless the end is open) and just beyond them (refused with exit code 2, naming the
flag). A type that is neither a range factory nor one of the list parsers checked below fails the test,
so that a new kind of range gets boundaries too.
"""

from __future__ import annotations

import argparse
import inspect
import math

import pytest

pytest.importorskip("transformers")

from lococo.recipes import cli

FACTORIES = ("int_at_least", "odd_int", "real")


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))
        elif action.type is not None and action.option_strings:
            yield path, parser, action


def _factory(kind) -> str | None:
    qualname = getattr(kind, "__qualname__", "")
    name = qualname.split(".<locals>")[0]
    if getattr(kind, "__module__", "") == "lococo.recipes.argtypes" and name in FACTORIES and "<locals>" in qualname:
        return name
    return None


def _bounds(kind) -> dict:
    return {k: v for k, v in inspect.getclosurevars(kind).nonlocals.items() if k in ("low", "high", "low_open")}


def _real(value: float) -> str:
    return repr(float(value))


def boundary_cases(factory: str, bounds: dict) -> list[tuple[str, object]]:
    """(text, the value parsed, or None when it must be refused) at the ends of a range and one step past them."""
    low, high = bounds.get("low"), bounds.get("high")
    if factory == "int_at_least":
        cases = [(str(low), low), (str(low - 1), None)]
        cases += [(str(high), high), (str(high + 1), None)] if high is not None else [(str(low + 10**12), low + 10**12)]
        return cases
    if factory == "odd_int":
        first = low if low % 2 else low + 1
        return [(str(first), first), (str(first - 2), None), (str(first + 1), None), (str(first + 2), first + 2)]
    cases = [("nan", None), ("inf", None), ("-inf", None)]
    if low is None:
        cases.append(("-1e300", -1e300))
    else:
        cases += [(_real(low), None if bounds["low_open"] else low), (_real(math.nextafter(low, -math.inf)), None),
                  (_real(math.nextafter(low, math.inf)), math.nextafter(low, math.inf))]
    if high is None:
        cases.append(("1e300", 1e300))
    else:
        cases += [(_real(high), high), (_real(math.nextafter(high, math.inf)), None),
                  (_real(math.nextafter(high, -math.inf)), math.nextafter(high, -math.inf))]
    return cases


# Types that are not argtypes' ranges, each with its boundaries: (accepted text, value), (refused text, None)
LIST_TYPES = {
    "bucket_edges": [("0,1", [0, 1]), ("-1,1", None), ("0,0", None), ("5", None)],
    "_lengths": [("128", [128]), ("127", None), ("128,4096", [128, 4096]), ("128,127", None)],
    "_depths": [("0,1", [0.0, 1.0]), ("-0.01", None), ("1.01", None), ("0.5", [0.5])],
    "int_list": [("1", [1]), ("0", None), ("1,2", [1, 2]), ("2,0", None)],
    "choices_list.<locals>.parse": [],   # names, not numbers (test_cli_validation)
}


def _required(parser: argparse.ArgumentParser) -> list[str]:
    return [part for action in parser._actions if action.required and action.option_strings
            for part in (action.option_strings[0], "x")]


PARSER = cli.build_parser()
ARGUMENTS = [(path, sub, action) for path, sub, action in _walk(PARSER)]


def test_every_typed_argument_is_a_known_range_or_list():
    unknown = [f"{' '.join(path)} {action.option_strings[0]}: {getattr(action.type, '__qualname__', action.type)}"
               for path, _, action in ARGUMENTS
               if action.type not in (int, float, str) and _factory(action.type) is None
               and getattr(action.type, "__qualname__", "") not in LIST_TYPES]
    assert not unknown, "arguments whose ranges this test does not know (give them boundaries here):\n" + \
        "\n".join(unknown)
    plain = [f"{' '.join(path)} {action.option_strings[0]}" for path, _, action in ARGUMENTS
             if action.type in (int, float)]
    assert not plain, f"numbers without a checked range: {plain}"


@pytest.mark.parametrize("path, sub, action", [
    pytest.param(path, sub, action, id=f"{' '.join(path)} {action.option_strings[0]}")
    for path, sub, action in ARGUMENTS
    if _factory(action.type) is not None or getattr(action.type, "__qualname__", "") in LIST_TYPES])
def test_the_range_holds_at_its_ends_and_not_one_past(capsys, path, sub, action):
    flag = action.option_strings[0]
    factory = _factory(action.type)
    cases = boundary_cases(factory, _bounds(action.type)) if factory else LIST_TYPES[action.type.__qualname__]
    for text, value in cases:
        argv = [*path, *_required(sub), f"{flag}={text}"]
        if value is None:
            with pytest.raises(SystemExit) as exit_info:
                PARSER.parse_args(argv)
            assert exit_info.value.code == 2, text
            err = capsys.readouterr().err
            assert f"argument {'/'.join(action.option_strings)}:" in err, (text, err)
        else:
            parsed = getattr(PARSER.parse_args(argv), action.dest)
            assert parsed == value and type(parsed) is type(value), (text, parsed)


def test_the_ranges_found_include_the_closed_seed_range_of_train():
    (seed,) = [action for path, _, action in ARGUMENTS if path == ("train",) and action.dest == "seed"]
    assert _factory(seed.type) == "int_at_least" and _bounds(seed.type) == {"low": 0, "high": 2**32 - 1}
    assert PARSER.parse_args(["train", "--output", "x", "--seed", "4294967295"]).seed == 4294967295
    found = {(_factory(action.type), tuple(sorted(_bounds(action.type).items())))
             for _, _, action in ARGUMENTS if _factory(action.type)}
    assert {f for f, _ in found} == set(FACTORIES)            # every factory has an argument to test it on
