"""Values in a sweep file: numbers written as text, dotted keys, ${vars} and the profile that sets them."""

from __future__ import annotations

import re

import yaml

from selfreplay.errors import SelfReplayError, did_you_mean
from selfreplay.rundir import flatten

BUILTIN_VARS = ("old", "new", "tokenizer", "vocab", "sweep")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
VAR = r"\$\{([A-Za-z0-9_]+)\}"


def nearest(word: str, valid) -> str:
    """"; did you mean 'X'?", or the valid choices when none is close."""
    return did_you_mean(word, valid) or f"; valid: {', '.join(valid)}"


def check_fields(mapping, valid, where: str) -> None:
    """An error naming the nearest valid field for any key of `mapping` not in `valid`."""
    if not isinstance(mapping, dict):
        raise SelfReplayError(f"{where} must be a mapping, got {type(mapping).__name__}: {mapping!r}")
    for key in mapping:
        if key not in valid:
            raise SelfReplayError(f"unknown field '{key}' in {where}{nearest(str(key), valid)}")


def number(value):
    """YAML reads 3e-3 as a string; numbers are numbers here, so names and comparisons agree."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        as_float = float(value)
        whole = as_float.is_integer() and "." not in value and "e" not in value.lower()
        return int(as_float) if whole else as_float
    return value


class _Whole:
    """A mapping that flatten must keep as one value (a {from: ...} setting)."""

    def __init__(self, value: dict):
        self.value = value


def _protect(tree: dict) -> dict:
    return {key: (_Whole(value) if "from" in value else _protect(value)) if isinstance(value, dict) else value
            for key, value in tree.items()}


def dotted(tree: dict) -> dict:
    """{'optim': {'lr': '1e-3'}} and {'optim.lr': 1e-3} both -> {'optim.lr': 0.001}; a {from: ...}
    mapping stays one value."""
    return {key: value.value if isinstance(value, _Whole) else number(value)
            for key, value in flatten(_protect(tree)).items()}


def substitute(value, variables: dict, where: str):
    """${NAME} -> the var's value (its own type when it is the whole string), in nested lists and mappings."""
    if isinstance(value, dict):
        return {k: substitute(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(match: re.Match):
        name = match.group(1)
        if name not in variables:
            raise SelfReplayError(f"{where} uses ${{{name}}}, which is not set{nearest(name, variables)}"
                                  f" (set it on the command line: {name}=VALUE)")
        return substitute(variables[name], variables, where)

    whole = re.fullmatch(VAR, value)
    return lookup(whole) if whole else re.sub(VAR, lambda m: str(lookup(m)), value)


def parse_overrides(overrides: list[str]) -> dict:
    """NAME=VALUE items -> {NAME: value}, each value read as YAML (so [1, 10] is a list)."""
    given = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SelfReplayError(f"sweep override {item!r} is not NAME=VALUE (for example profile=small)")
        given[name.strip()] = number(yaml.safe_load(value)) if value.strip() else None
    return given


def choose_vars(document: dict, overrides: list[str], builtins: dict) -> dict:
    """The vars of a sweep: built-ins <- `vars` <- the chosen profile <- NAME=VALUE overrides."""
    profiles = document.get("profiles") or {}
    given = parse_overrides(overrides)
    profile = given.pop("profile", next(iter(profiles), None))
    if profiles and profile not in profiles:
        raise SelfReplayError(f"unknown profile {profile!r}{nearest(str(profile), profiles)}")
    declared = {**(document.get("vars") or {}), **(profiles.get(profile) or {})}
    shadowed = [name for name in declared if name in BUILTIN_VARS]
    if shadowed:
        raise SelfReplayError(f"var {shadowed[0]!r} is built in ({', '.join(BUILTIN_VARS)}): give yours another name")
    variables = {**builtins, **declared}
    for name in given:
        if name not in variables and name not in BUILTIN_VARS:
            raise SelfReplayError(f"unknown sweep var '{name}'{nearest(name, [*variables, 'profile'])}")
    variables.update(given)
    variables["profile"] = profile
    return {name: number(value) for name, value in variables.items()}
