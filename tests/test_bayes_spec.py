"""Model spec files: the catalogue, where it is found, and validation errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from latefusion.bayes import ModelSpec, list_models, load_spec
from latefusion.bayes import spec as spec_module
from latefusion.bayes.spec import DEVIATIONS

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


def test_catalogue_has_every_family() -> None:
    names = list_models()
    assert {"horseshoe", "normal"} <= set(names)
    assert {load_spec(n).deviation for n in names} == set(DEVIATIONS)


@pytest.mark.parametrize("name", sorted(p.stem for p in REPO_MODELS.glob("*.toml")))
def test_catalogue_entries_load(name: str) -> None:
    spec = load_spec(name)
    assert spec.name == name
    assert len(spec.description) > 40, "a catalogue model describes itself in words"
    assert spec.global_scale > 0 and spec.beta_scale > 0
    assert set(spec.params) == set(DEVIATIONS[spec.deviation])


def test_default_spec_values() -> None:
    spec = load_spec("horseshoe")
    assert (spec.deviation, spec.global_scale, spec.beta_scale) == ("horseshoe", 1.0, 10.0)
    assert load_spec(spec) is spec


def test_packaged_and_repository_catalogues_resolve_the_same_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The editable install only has the repository's models/ ...
    from_repo = {n: load_spec(n).to_dict() for n in list_models()}
    assert all(Path(load_spec(n).source).parent == REPO_MODELS.resolve() for n in from_repo)

    # ... a wheel only has latefusion/models: imitate it and hide the repository.
    packaged = tmp_path / "latefusion" / "models"
    shutil.copytree(REPO_MODELS, packaged)
    monkeypatch.setattr(spec_module, "_packaged_models", lambda: packaged)
    monkeypatch.setattr(spec_module, "_REPO_MODELS", tmp_path / "absent")
    assert spec_module.models_dirs() == [packaged.resolve()]
    from_wheel = {n: load_spec(n).to_dict() for n in list_models()}
    assert from_wheel == from_repo
    assert Path(load_spec("horseshoe").source).parent == packaged


def test_user_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "my_rhs.toml"
    path.write_text(
        'description = "my regularised horseshoe"\n'
        'deviation = "regularized_horseshoe"\n'
        "slab_scale = 3\n"
    )
    spec = load_spec(path)
    assert spec.name == "my_rhs"
    assert spec.params == {"slab_scale": 3.0, "slab_df": 4.0}
    assert spec.parameterization == "marginalized"
    assert load_spec(str(path)) == spec


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('deviation = "horseshoe"', "missing required key 'description'"),
        ('description = "x"', "missing required key 'deviation'"),
        ('description = "x"\ndeviation = "cauchy"', "key 'deviation' is 'cauchy'"),
        ('description = "x"\ndeviation = "normal"\nnu = 3', r"unknown key\(s\) \['nu'\]"),
        ('description = "x"\ndeviation = "normal"\nglobal_scale = -1', "'global_scale'"),
        ('description = "x"\ndeviation = "normal"\nbeta_scale = "big"', "'beta_scale' must be"),
        ('description = "x"\ndeviation = "normal"\nglobal_scale = true', "'global_scale'"),
        ('description = "x"\ndeviation = "student_t"\nnu = 0', "'nu' must be finite and > 0"),
        ('description = "x"\ndeviation = "normal"\nparameterization = "ncp"', "parameteriz"),
        ('description = ""\ndeviation = "normal"', "'description' must be a non-empty"),
        ("description = [", "not valid TOML"),
    ],
)
def test_invalid_spec_names_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_unknown_names_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model named 'horsehoe'"):
        load_spec("horsehoe")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(tmp_path / "absent.toml")


def test_spec_in_code_is_validated_and_replace() -> None:
    with pytest.raises(ValueError, match="unknown key"):
        ModelSpec(name="x", description="x", deviation="normal", params={"nu": 3.0})
    spec = load_spec("student_t").replace(nu=7, global_scale=0.5, parameterization="centered")
    assert spec.params == {"nu": 7.0}
    assert (spec.global_scale, spec.parameterization) == (0.5, "centered")
    assert spec.replace(deviation="normal").params == {}
