"""The recipe runner: caching, failures, bad input — on small step kinds registered here (no models)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from posthoc.cli import main

from posthoc.errors import DataError
from posthoc.recipes import RecipeError, list_recipes, load_recipe, run_recipe
from posthoc.recipes.registry import STEP_KINDS, step_kind

CALLS: list[str] = []

if "test_copy" not in STEP_KINDS:

    @step_kind("test_copy", inputs=("source",), outputs=("out",))
    def _copy(ctx, *, out: Path, source: Path | None = None, text: str = "", repeat: int = 1) -> dict:
        """Write `text` (and the source's content) `repeat` times."""
        CALLS.append(ctx.name)
        content = (source.read_text() if source else "") + text * repeat
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(content)
        return {"chars": len(content)}

    @step_kind("test_fail", inputs=("source",), outputs=("out",))
    def _fail(ctx, *, source: Path, out: Path, bug: bool = False) -> dict:
        """Always fails: with a typed error, or (bug) with a plain Python exception."""
        CALLS.append(ctx.name)
        if bug:
            raise ZeroDivisionError("division by zero")
        raise DataError(f"{source.name}: cannot use this")

    @step_kind("test_concat", inputs=("sources",), outputs=("out",))
    def _concat(ctx, *, sources: dict, out: Path) -> dict:
        """Concatenate a table of files (a nested path value, like evaluate's encoders)."""
        out.write_text("".join(Path(path).read_text() for path in sources.values()))
        return {}


def write_recipe(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


CHAIN = """
    name: chain
    description: two steps
    variables:
      word: hi
      repeat: 2
    profiles:
      reduced: {repeat: 1}
    steps:
      - name: first
        step: test_copy
        text: ${word}
        repeat: ${repeat}
        out: a/first.txt
      - name: second
        step: test_copy
        source: a/first.txt
        text: "!"
        out: b/second.txt
"""


def test_runs_then_skips_then_reruns_what_changed(tmp_path):
    recipe = write_recipe(tmp_path, CHAIN)
    work = tmp_path / "work"
    CALLS.clear()
    result = run_recipe(recipe, work)
    assert [o.status for o in result.outcomes] == ["ran", "ran"]
    assert (work / "b/second.txt").read_text() == "hihi!"
    assert result.outcome("first").summary == {"chars": 4}

    CALLS.clear()
    again = run_recipe(recipe, work)
    assert [o.status for o in again.outcomes] == ["skipped", "skipped"] and CALLS == []

    # A changed setting reruns that step, and the step that reads its output.
    CALLS.clear()
    run_recipe(recipe, work, overrides={"word": "yo"})
    assert CALLS == ["first", "second"] and (work / "b/second.txt").read_text() == "yoyo!"

    # A profile is a bundle of overrides.
    CALLS.clear()
    run_recipe(recipe, work, profile="reduced", overrides={"word": "yo"})
    assert (work / "b/second.txt").read_text() == "yo!"

    # An input changed on disk reruns the steps that read it, not those before.
    CALLS.clear()
    first = work / "a/first.txt"
    first.write_text("edited")
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    run_recipe(recipe, work, profile="reduced", overrides={"word": "yo"})
    assert CALLS == ["first", "second"]  # `first`'s own output changed under it: it runs again too

    # A deleted output reruns its step.
    CALLS.clear()
    (work / "b/second.txt").unlink()
    run_recipe(recipe, work, profile="reduced", overrides={"word": "yo"})
    assert CALLS == ["second"]


def test_for_each_expands_steps(tmp_path):
    recipe = write_recipe(tmp_path, """
        variables: {langs: [de, fr]}
        steps:
          - name: make
            step: test_copy
            for_each: {lang: "${langs}"}
            text: ${lang}
            out: out/${lang}.txt
          - name: join
            step: test_copy
            source: out/fr.txt
            out: joined.txt
    """)
    result = run_recipe(recipe, tmp_path / "w")
    assert [o.name for o in result.outcomes] == ["make-de", "make-fr", "join"]
    assert (tmp_path / "w/out/de.txt").read_text() == "de"


def test_failed_step_is_named_and_finished_steps_are_kept(tmp_path):
    recipe = write_recipe(tmp_path, CHAIN.replace("step: test_copy\n        source: a/first.txt", "step: test_fail\n        source: a/first.txt").replace('        text: "!"\n', ""))
    work = tmp_path / "work"
    CALLS.clear()
    with pytest.raises(RecipeError, match=r"step 'second' \(test_fail\) failed: first.txt: cannot use this.*1 step\(s\) before it are kept"):
        run_recipe(recipe, work)
    assert (work / "a/first.txt").read_text() == "hihi"
    assert not (work / "b").exists()
    # Any exception inside a step (a library bug too) is reported with the step named.
    buggy = write_recipe(tmp_path, CHAIN.replace("step: test_copy\n        source: a/first.txt", "step: test_fail\n        bug: true\n        source: a/first.txt").replace('        text: "!"\n', ""), "bug.yaml")
    with pytest.raises(RecipeError, match=r"step 'second' \(test_fail\) failed: ZeroDivisionError: division by zero"):
        run_recipe(buggy, work)
    # Fixed, the recipe continues from the failed step.
    fixed = write_recipe(tmp_path, CHAIN)
    CALLS.clear()
    result = run_recipe(fixed, work)
    assert CALLS == ["second"] and result.outcome("first").status == "skipped"


@pytest.mark.parametrize(
    "body, message",
    [
        ("steps:\n  - {step: finetun, out: x}\n", r"unknown step kind 'finetun'; valid kinds: .*finetune"),
        ("steps:\n  - {step: test_copy, out: x, txet: a}\n", r"unknown key 'txet' for a test_copy step; valid keys: name, step, for_each, out, source, text, repeat"),
        ("stpes: []\n", r"unknown key 'stpes'; valid keys: name, description, variables, profiles, steps"),
        ("steps:\n  - {step: test_copy, text: a}\n", r"needs the key 'out'"),
        ("steps:\n  - {step: test_copy, out: x, repeat: two}\n", r"The 'repeat' key of a test_copy step must be an int. Got 'two' instead"),
        ("steps:\n  - {step: test_copy, out: x, text: '${nope}'}\n", r"unknown variable \$\{nope\}"),
        ("steps:\n  - {step: test_copy, source: missing.txt, out: x}\n", r"input missing.txt is produced by no earlier step and is not on disk"),
        ("steps:\n  - {step: test_copy, out: ../outside.txt}\n", r"'../outside.txt' leaves the work directory"),
        ("steps:\n  - {step: test_copy, out: /tmp/abs.txt}\n", r"'/tmp/abs.txt' is an absolute path"),
        ("steps:\n  - {step: test_copy, out: a/x}\n  - {step: test_copy, out: a}\n", r"overlaps the output a/x"),
        ("steps:\n  - {step: test_copy, out: x, source: asset:nosuch}\n", r"unknown asset 'nosuch'; assets: .*minilm"),
    ],
)
def test_bad_recipes_fail_before_anything_runs(tmp_path, body, message):
    recipe = write_recipe(tmp_path, body)
    CALLS.clear()
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe, tmp_path / "work")
    assert CALLS == [] and not (tmp_path / "work").exists()


def test_paths_from_the_command_line_may_leave_the_work_dir(tmp_path):
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("from outside ")
    recipe = write_recipe(tmp_path, """
        variables: {src: inside.txt}
        steps:
          - {step: test_copy, source: "${src}", text: ok, out: out.txt}
    """)
    with pytest.raises(RecipeError, match="inside.txt is produced by no earlier step"):
        load_recipe(recipe, tmp_path / "w")
    result = run_recipe(recipe, tmp_path / "w", overrides={"src": str(outside)})
    assert (result.work_dir / "out.txt").read_text() == "from outside ok"
    # The same absolute path written into the recipe itself is refused.
    written = write_recipe(tmp_path, f"steps:\n  - {{step: test_copy, source: {outside}, out: out.txt}}\n", "w.yaml")
    with pytest.raises(RecipeError, match="is an absolute path"):
        load_recipe(written, tmp_path / "w2")


def test_nested_paths_from_the_command_line_may_leave_the_work_dir(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.txt").write_text("A")
    (tmp_path / "secret.txt").write_text("S")
    body = """
        variables: {src: somewhere}
        steps:
          - {step: test_concat, sources: {first: "${src}", again: "${src}/../elsewhere/a.txt"}, out: out.txt}
    """
    recipe = write_recipe(tmp_path, body.replace("${src}\"", "${src}/a.txt\""))
    result = run_recipe(recipe, tmp_path / "w", overrides={"src": str(outside)})
    assert (result.work_dir / "out.txt").read_text() == "AA"
    # A nested value that climbs out of the folder given on the command line is the recipe's, and refused.
    climbing = write_recipe(tmp_path, body.replace("${src}\"", "${src}/../secret.txt\""), "climb.yaml")
    with pytest.raises(RecipeError, match="secret.txt' is an absolute path"):
        load_recipe(climbing, tmp_path / "w2", overrides={"src": str(outside)})


def test_unknown_variable_or_profile_lists_the_valid_ones(tmp_path):
    recipe = write_recipe(tmp_path, CHAIN)
    with pytest.raises(RecipeError, match=r"--set: unknown variable 'wrod'; variables of this recipe: repeat, word"):
        load_recipe(recipe, tmp_path / "w", overrides={"wrod": 1})
    with pytest.raises(RecipeError, match=r"no profile 'tiny'; profiles of this recipe: reduced"):
        load_recipe(recipe, tmp_path / "w", profile="tiny")


def test_cli_run_list_and_errors(tmp_path):
    recipe = write_recipe(tmp_path, CHAIN)
    runner = CliRunner()
    ok = runner.invoke(main, ["recipe", "run", str(recipe), "--work-dir", str(tmp_path / "w"), "--set", "repeat=3", "--quiet"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "w/b/second.txt").read_text() == "hihihi!"
    assert "[run]  first" in ok.output
    bad = runner.invoke(main, ["recipe", "run", str(recipe), "--work-dir", str(tmp_path / "w"), "--set", "nope=1"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and bad.output.startswith("error: --set: unknown variable")
    listing = runner.invoke(main, ["recipe", "list"])
    assert listing.exit_code == 0
    lines = listing.output.strip().splitlines()
    assert {line.split()[0] for line in lines} >= {"task_soup", "cross_lingual", "cross_modal"}
    assert all(len(line.split()) > 3 for line in lines)  # a name and a description on one line each


def test_bundled_recipes_parse_with_their_reduced_profile(tmp_path):
    names = {r.name for r in list_recipes()}
    assert {"task_soup", "cross_lingual", "cross_modal"} <= names
    import yaml

    for bundled in list_recipes():
        profiles = list(yaml.safe_load(bundled.path.read_text()).get("profiles") or {})
        assert "reduced" in profiles, bundled.name
        for profile in [None, *profiles]:  # the full setting and every profile parse and resolve
            recipe = load_recipe(bundled.name, tmp_path / bundled.name, profile=profile)
            assert recipe.steps and all(s.kind in STEP_KINDS for s in recipe.steps)


def test_records_hold_settings_and_output_stamps(tmp_path):
    recipe = write_recipe(tmp_path, CHAIN)
    run_recipe(recipe, tmp_path / "w")
    record = json.loads((tmp_path / "w/.recipe/second.json").read_text())
    assert record["key"]["settings"]["text"] == "!"
    assert list(record["outputs"]) == [str(tmp_path / "w/b/second.txt")]
