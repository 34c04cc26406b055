"""Model profiles: the models file's errors name the line and field; instances get the names."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from launcher.frontdoor.profiles import MODEL_ANNOTATION, ModelProfile, ProfileError, parse_models_file, plain_errors
from tests.launcher_process import REPO, free_port

GOOD = """\
idle_timeout: 120
models:
  tiny:
    options: "--model /models/tiny --max-model-len 256"
    aliases: [tiny-chat]
    idle_timeout: 0
  other:
    options: "--model /models/other"
    gpu_uuids: [GPU-0]
    share_gpu: true
"""


def test_a_good_file_parses() -> None:
    parsed = parse_models_file(GOOD)
    assert parsed.idle_timeout == 120
    assert parsed.models["tiny"].aliases == ["tiny-chat"] and parsed.models["tiny"].idle_timeout == 0
    assert parsed.models["other"].gpu_uuids == ["GPU-0"] and parsed.models["other"].share_gpu


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("idle_timeout: 0", "idle_timeout: -1"), "line 6: model 'tiny', field 'idle_timeout'"),
        (GOOD.replace("    share_gpu: true", "    share_gpus: true"), "line 10: unknown field 'share_gpus' in model"),
        (GOOD.replace('    options: "--model /models/other"\n', ""), "line 7: model 'other' has no 'options'"),
        (GOOD.replace("aliases: [tiny-chat]", "aliases: [other]"), "'other' is used by both 'tiny' and 'other'"),
        (GOOD.replace("models:", "models: [oops"), "line 3 column 7: not valid YAML"),
        ("- just\n- a list\n", "line 1: expected a mapping"),
        (GOOD.replace("aliases: [tiny-chat]", "aliases: ['two words']"), "line 5: model 'tiny', field 'aliases'"),
        (GOOD.replace("  other:", "  'an other':"), "line 7: 'an other' is not a model name"),
        (
            GOOD.replace("    share_gpu: true", "    env_vars: {A=B: '1'}"),
            "line 10: model 'other', field 'env_vars': 'A=B' is not a valid environment variable name",
        ),
    ],
)
def test_a_bad_file_names_the_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ProfileError) as caught:
        parse_models_file(text, source="models file m.yaml")
    assert str(caught.value).startswith("models file m.yaml")
    assert expected in str(caught.value)


def test_instance_config_adds_the_names_clients_use_unless_given() -> None:
    profile = ModelProfile(options="--model /m --max-model-len 256", aliases=["x y"[:1]], annotations={"team": "a"})
    config = profile.instance_config("tiny")
    assert shlex.split(config.options)[-5:] == ["--served-model-name", "tiny", "x", "--host", "127.0.0.1"]
    assert config.annotations == {"team": "a", MODEL_ANNOTATION: "tiny"}
    own = ModelProfile(options="--model /m --served-model-name=mine --host=::").instance_config("tiny")
    assert own.options == "--model /m --served-model-name=mine --host=::"  # both given: nothing added


def test_the_launcher_refuses_to_start_with_a_bad_models_file(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(GOOD.replace("idle_timeout: 0", "idle_timeout: soon"))
    result = subprocess.run(
        [sys.executable, "-m", "launcher", "--port", str(free_port()), "--models-file", str(models)],
        cwd=REPO, env={**os.environ, "LAUNCHER_FORKSERVER_WORKLOAD": "standin"}, check=False,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"launcher: models file {models}, line 6: model 'tiny', field 'idle_timeout': Input should be a valid number"
        in result.stderr
    )


PROFILE_FIELDS = (
    "options, env_vars, gpu_uuids, annotations, idle_timeout, start_timeout, start_keepalive, idle, sleep_level, "
    "memory, gpu_memory, "
    "aliases, preload, share_gpu"
)


def problems(text: str) -> list[str]:
    """The lines of the error for this models file (named models.yaml)."""
    with pytest.raises(ProfileError) as caught:
        parse_models_file(text, source="models file models.yaml")
    return str(caught.value).splitlines()


def test_an_unknown_profile_field_is_named_with_a_suggestion() -> None:
    text = "models:\n  tiny:\n    options: --model /m\n    alias: [tc]\n"
    assert problems(text) == [
        (
            "models file models.yaml, line 4: unknown field 'alias' in model 'tiny' (did you mean 'aliases'?); "
            f"valid fields: {PROFILE_FIELDS}"
        )
    ]


def test_an_unknown_top_level_field_is_named_with_a_suggestion() -> None:
    assert problems("idle_timout: 60\nmodels:\n  tiny:\n    options: --model /m\n") == [
        (
            "models file models.yaml, line 1: unknown top-level field 'idle_timout' (did you mean 'idle_timeout'?); "
            "the top level has: idle_timeout, models"
        )
    ]
    # Nothing close: no suggestion, still the list.
    assert problems("colour: blue\n") == [
        "models file models.yaml, line 1: unknown top-level field 'colour'; the top level has: idle_timeout, models"
    ]


def test_a_profile_at_the_top_level_is_said_to_go_under_models() -> None:
    text = "idle_timeout: 60\nmodels:\ntiny:\n  options: --model /m\n"  # tiny at column 0: models is null
    assert problems(text) == [
        (
            "models file models.yaml, line 3: 'tiny' is at the top level; "
            "model profiles go under 'models:' (indent it by two spaces)"
        )
    ]  # and not "models: Input should be a valid dictionary" as well
    assert problems("models:\n") == [
        (
            "models file models.yaml, line 1: 'models' is empty; "
            "list the model profiles under it, each indented by two spaces (or leave 'models' out)"
        )
    ]


def test_profile_fields_directly_under_models_are_explained() -> None:
    hint = "did you put a profile's fields directly under 'models:'?"
    assert problems('models: {options: "--model /m"}\n') == [
        (
            "models file models.yaml, line 1: model 'options' should be a mapping of fields (options, aliases, ...), "
            f"not a string; {hint}"
        )
    ]
    assert problems("models:\n  options: --model /m\n  aliases: [tc]\n") == [
        (
            f"models file models.yaml, line 2: model 'options' should be a mapping of fields (options, aliases, ...), "
            f"not a string; {hint}"
        ),
        (
            f"models file models.yaml, line 3: model 'aliases' should be a mapping of fields (options, aliases, ...), "
            f"not a list; {hint}"
        ),
    ]


def test_a_profile_without_options_says_what_options_are() -> None:
    assert problems("models:\n  tiny:\n    aliases: [tc]\n") == [
        (
            "models file models.yaml, line 2: model 'tiny' has no 'options' "
            '(the vLLM flags, e.g. options: "--model /path/to/model")'
        )
    ]


def test_a_type_error_names_the_model_and_field_and_keeps_pydantics_words() -> None:
    text = (
        "models:\n  tiny:\n    options: --model /m\n    idle_timeout: soon\n    gpu_uuids:\n      - GPU-0\n      - 1\n"
    )
    assert problems(text) == [
        (
            "models file models.yaml, line 4: model 'tiny', field 'idle_timeout': "
            "Input should be a valid number, unable to parse string as a number (got 'soon')"
        ),
        "models file models.yaml, line 7: model 'tiny', field 'gpu_uuids[1]': Input should be a valid string (got 1)",
    ]


def test_several_problems_are_one_a_line_in_line_order() -> None:
    text = "models:\n  b:\n    options: --model /b\n    preloda: true\n  a:\n    aliases: [x]\nidle_timeout: -1\n"
    lines = problems(text)
    assert [line.split(":")[0] for line in lines] == [f"models file models.yaml, line {n}" for n in (4, 5, 7)]
    assert "(did you mean 'preload'?)" in lines[0] and "model 'a' has no 'options'" in lines[1]


def test_plain_errors_words_a_put_body_too() -> None:
    with pytest.raises(ValidationError) as caught:
        ModelProfile.model_validate({"options": "--model /m", "share-gpu": True, "idle_timeout": "soon"})
    assert plain_errors(caught.value, model="tiny") == [
        (
            "model 'tiny', field 'idle_timeout': Input should be a valid number, unable to parse string as a number "
            "(got 'soon')"
        ),
        f"unknown field 'share-gpu' in model 'tiny' (did you mean 'share_gpu'?); valid fields: {PROFILE_FIELDS}",
    ]
    with pytest.raises(ValidationError) as caught:
        ModelProfile.model_validate({"aliases": ["x"]})
    assert plain_errors(caught.value) == [
        'the model profile has no \'options\' (the vLLM flags, e.g. "options": "--model /path/to/model")'
    ]


_FIELDS = list(ModelProfile.model_fields)
_TYPO_CHARACTERS = "abcdefghijklmnopqrstuvwxyz_-0123456789"


@st.composite
def one_character_typos(draw: st.DrawFn) -> tuple[str, str]:
    """(a valid field, that field with one character replaced, left out, added or swapped with the next)."""
    field = draw(st.sampled_from(_FIELDS))
    index = draw(st.integers(0, len(field)))  # len(field): an insert at the end
    character = draw(st.sampled_from(_TYPO_CHARACTERS))
    edit = draw(st.sampled_from(["replace", "delete", "insert", "swap"]))
    if edit != "insert":
        index = min(index, len(field) - 1)
    if edit == "replace":
        typo = field[:index] + character + field[index + 1 :]
    elif edit == "delete":
        typo = field[:index] + field[index + 1 :]
    elif edit == "insert":
        typo = field[:index] + character + field[index:]
    else:
        typo = field[:index] + field[index + 1 : index + 2] + field[index] + field[index + 2 :]
    return field, typo


@given(one_character_typos())
def test_any_one_character_typo_of_a_field_suggests_that_field(case: tuple[str, str]) -> None:
    field, typo = case
    if typo in _FIELDS:
        return  # not a typo (a swap of two equal characters)
    text = f"models:\n  tiny:\n    options: --model /m\n    {typo}: 1\n"
    (line,) = problems(text)
    assert line.startswith(f"models file models.yaml, line 4: unknown field {typo!r} in model 'tiny'")
    assert f"(did you mean {field!r}?)" in line
