"""Generated malformed recipes: `umv2 sweep plan` and `umv2 sweep run` each exit 2 with only
`error: …` lines (no traceback) and leave every file as it was.

A valid micro recipe is broken by one to three mutations, each drawn with its own values (names,
wrong-typed values, out-of-range numbers) and each invalid on its own. Mutations caught while the
recipe is read are all reported together, so each must leave its mark in stderr; those found while
planning grid points come after the recipe is read and need only one of them to show.
"""

import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umv2cli.config import TrainConfig
from umv2cli.sweeps.recipe import TOP_KEYS

VALID = {
    "name": "hypo",
    "model": "tiny-ultramemv2",
    "seeds": [0],
    "match": "fixed-backbone",
    "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_batches": 1, "task_samples": 0},
    "grid": {"topm": [2, 4]},
}

names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)
wrong_scalars = st.one_of(  # never a valid integer, float or string where one is asked for
    st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(names, st.integers(), max_size=1),
    st.datetimes(min_value=datetime.datetime(1970, 1, 1), max_value=datetime.datetime(2100, 1, 1)))
non_positive = st.one_of(st.integers(max_value=0), st.sampled_from([-1e300, -0.5, 0.0]))
floats = functools.partial(st.floats, allow_subnormal=False)  # a training run in this process flushes them
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _mutations(draw) -> dict[str, tuple[list[tuple[tuple, object]], str, bool]]:
    """name → ([(path, value) it sets], text it leaves in stderr, found while the recipe is read?)."""
    unknown_key = draw(names.filter(lambda k: k not in TOP_KEYS))
    unknown_train = draw(names.filter(lambda k: k not in TRAIN_FIELDS))
    wrong = draw(wrong_scalars)
    big_topm = draw(st.integers(min_value=257, max_value=10**9))
    big_krc = draw(st.integers(min_value=17, max_value=10**6))
    preset = "no-such-" + draw(names)
    return {
        "unknown key": ([((unknown_key,), 1)], f"{unknown_key}: unknown key", True),
        "name type": ([(("name",), wrong)], "name=", True),
        "name escapes": ([(("name",), "../out")], "name=", True),
        "data type": ([(("data",), wrong)], "data=", True),
        "model type": ([(("model",), draw(st.one_of(st.integers(), st.booleans(), st.lists(names, max_size=2))))],
                       "model:", True),
        "seeds": ([(("seeds",), draw(st.one_of(st.just([]), st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                                               st.just("0"), st.just([1.5]), st.just([0, 0]))))], "seed", True),
        "corner seed twice": ([(("corner_seeds",), [5, 5])], "appears twice", True),
        "match": ([(("match",), draw(st.one_of(names, wrong_scalars)))], "match=", True),
        "tokens": ([(("tokens",), draw(st.one_of(non_positive, wrong_scalars, st.sampled_from(
            [float("inf"), float("nan"), "many"]))))], "tokens=", True),
        "train not a table": ([(("train",), draw(st.one_of(st.integers(), st.lists(st.integers(), max_size=2))))],
                              "train: expected a table", True),
        "train unknown field": ([(("train", unknown_train), 1)], f"train.{unknown_train}: unknown field", True),
        "train wrong type": ([(("train", "steps"), draw(st.one_of(st.text(string.ascii_letters, max_size=3),
                                                                   floats(0.5, 9.5), st.booleans())))],
                             "train.steps=", True),
        "train non-positive": ([(("train", "batch_size"), draw(st.integers(max_value=0)))], "train.batch_size=", True),
        "train negative lr": ([(("train", "lr"), draw(floats(max_value=0.0, allow_nan=False)))], "train.lr", True),
        "train seed": ([(("train", "seed"), 3)], "train.seed", True),
        "grid not a table": ([(("grid",), [1])], "grid: expected a table", True),
        "empty grid": ([(("grid",), {})], "grid: empty", True),
        "non-list axis": ([(("grid", "topm"), draw(st.integers(1, 8)))], "grid.topm: expected a non-empty list", True),
        "empty axis": ([(("grid", "sparse.dv"), [])], "grid.sparse.dv: expected a non-empty list", True),
        "unknown axis": ([(("grid", "x_" + draw(names)), [1])], "not a model field", True),
        "kind axis": ([(("grid", "sparse.kind"), ["moe"])], "grid.sparse.kind", True),
        "topm not positive": ([(("grid", "topm"), [draw(st.integers(max_value=0))])], "grid.topm[0]=", True),
        "sparse_params not positive": ([(("grid", "sparse_params"), [draw(non_positive)])], "grid.sparse_params[0]=",
                                       True),
        "sparse_params wrong type": ([(("grid", "sparse_params"), [wrong])], "grid.sparse_params[0]=", True),
        "duplicate values": ([(("grid", "sparse.dv"), [8, 8])], "appears twice", True),
        "bad tune": ([(("tune",), {"lr": {"low": 1.0, "high": draw(floats(-1.0, 1.0))}})], "tune.lr", True),
        "tune searches nothing": ([(("tune",), {"n_trials": 2})], "tune: searches nothing", True),
        "unknown preset": ([(("model",), preset)], f"preset '{preset}'", False),
        "unknown preset on an axis": ([(("grid", "model"), ["tiny-dense", preset])], f"preset '{preset}'", False),
        "model table field": ([(("model",), {"preset": "tiny-ultramemv2", unknown_key: 1})], f"{unknown_key}:", False),
        "field wrong type": ([(("grid", "sparse.dv"), [wrong])], "grid.sparse.dv[0]=", False),
        "field not positive": ([(("grid", "ffn_hidden"), [draw(st.integers(max_value=-1))])], "ffn_hidden=", False),
        "topm larger than the table": ([(("grid", "topm"), [big_topm])], f"sparse.topm={big_topm}", False),
        "k_rc larger than the keys": ([(("grid", "sparse.k_rc"), [big_krc])], f"sparse.k_rc={big_krc}", False),
        "sparse field of a dense model": ([(("model",), "tiny-dense"), (("grid", "sparse.dv"), [8])],
                                          "no sparse layer", False),
        "budget exceeded": ([(("match",), "iso-flop"), (("grid", "sparse_params"), [1e9])], "needs ffn_hidden=",
                            False),
        "sequence too long": ([(("train", "seq_len"), 4096)], "train.seq_len=4096", False),
        "tuned file missing": ([(("tuned",), "no-such-best.toml")], "no such file", False),
        "sparse_params round alike": ([(("grid", "sparse_params"), [16384, 16385])], "give the same run", False),
    }


def _get(recipe: dict, path: tuple):
    for key in path:
        if not isinstance(recipe, dict) or key not in recipe:
            return KeyError
        recipe = recipe[key]
    return recipe


@st.composite
def malformed(draw) -> tuple[str, list[tuple[str, bool]]]:
    """A recipe's text and the (stderr mark, found-at-read) of each mutation that survived the
    ones applied after it (a later one may overwrite an earlier one's value, or its table)."""
    mutations = _mutations(draw)
    chosen = draw(st.lists(st.sampled_from(sorted(mutations)), min_size=1, max_size=3, unique=True))
    recipe = json.loads(json.dumps(VALID))
    applied = []
    for name in chosen:
        sets = mutations[name][0]
        if all(len(path) == 1 or isinstance(recipe.get(path[0]), dict) for path, _ in sets):
            for path, value in sets:
                (recipe if len(path) == 1 else recipe[path[0]])[path[-1]] = copy.deepcopy(value)
            applied.append(name)
    text = to_toml(recipe)
    if draw(st.integers(0, 3)) == 0:  # one in four: also break the syntax
        text += draw(st.sampled_from(["\n[grid\n", "\nname = \n", "\n= 3\n", "\ntopm = [1,\n", '\n"open\n']))
        return text, [("cannot parse", True)]
    survived = [n for n in applied if all(repr(_get(recipe, path)) == repr(value) for path, value in mutations[n][0])]
    return text, [mutations[n][1:] for n in survived]


def to_toml(recipe: dict) -> str:
    scalars = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    tables = [f"\n[{json.dumps(k)}]\n" + "\n".join(f"{json.dumps(f)} = {toml_value(x)}" for f, x in v.items())
              for k, v in recipe.items() if isinstance(v, dict)]
    return "\n".join(scalars) + "\n" + "\n".join(tables) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            if p.is_file() else (0, "dir") for p in sorted(root.rglob("*"))}


def test_the_unbroken_recipe_plans(tmp_path, umv2):
    (tmp_path / "r.toml").write_text(to_toml(VALID))
    code, out, err = umv2("sweep", "plan", tmp_path / "r.toml", "--json")
    assert code == 0 and len(json.loads(out)) == 2, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed())
def test_a_malformed_recipe_exits_2_with_error_lines_and_changes_no_file(umv2, case):
    text, marks = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "r.toml").write_text(text)
        before = snapshot(root)
        for command in (["sweep", "plan", root / "r.toml"], ["sweep", "run", root / "r.toml", "--out", root / "out"]):
            code, out, err = umv2(*command)
            lines = err.splitlines()
            assert code == 2 and out == "", (command, text, out, err)
            assert lines and all(line.startswith("error: ") for line in lines), (text, err)
            assert len(lines) == len(set(lines)) and "Traceback" not in err, (text, err)
            at_read = [mark for mark, read in marks if read]
            assert all(mark in err for mark in at_read) if at_read else any(mark in err for mark, _ in marks), (
                text, marks, err)
            assert snapshot(root) == before, text
