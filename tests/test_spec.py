"""Tests for ticketsearch.spec: defaults, validation messages, trials, hashing, I/O."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import Field, ValidationError

from ticketsearch.cli import main
from ticketsearch.methods import Method, methods, register, unregister
from ticketsearch.methods.cs import CSSpec
from ticketsearch.methods.imp import IMPSpec
from ticketsearch.spec import (
    TRIAL_ID_PATTERN,
    CodeSpec,
    DataSpec,
    JobSpec,
    MethodSpec,
    ModelSpec,
    RecipeSpec,
    ResourcesSpec,
    RetrainSpec,
    SpecError,
    StorageSpec,
    TrackingSpec,
    TrainSpec,
    TrialSpec,
    apply_overrides,
    dump_job,
    format_number,
    job_json_schema,
    load_job,
    parse_job,
    rescale_milestones,
    spec_error_from,
)


def minimal(**extra: Any) -> dict[str, Any]:
    """The smallest valid raw spec, plus ``extra`` top-level keys."""
    raw: dict[str, Any] = {"name": "job", "methods": {"cs": {}}}
    raw.update(extra)
    return raw


def problems_of(raw: dict[str, Any]) -> list[str]:
    """The problem lines parse_job reports for ``raw`` (fails if it is accepted)."""
    with pytest.raises(SpecError) as info:
        parse_job(raw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ defaults


def test_defaults_match_the_spec_values() -> None:
    job = parse_job({"name": "job", "methods": {"cs": {}, "imp": {}, "dense": {}}})
    cs, imp, train = job.methods["cs"], job.methods["imp"], job.train
    assert (cs.lambda_, cs.beta_final, cs.mask_init, cs.rounds) == (1e-8, 200.0, 0.0, 5)
    assert (cs.beta_schedule, cs.soft_reset, cs.seed, cs.sweep) == ("epoch", "scaled", 0, {})
    assert (imp.rounds, imp.prune_fraction, imp.scope, imp.rewind_between_rounds) == (
        30,
        0.2,
        "global",
        True,
    )
    assert train.epochs_per_round == 85
    assert train.lr_milestones == [56, 71]
    assert (train.lr, train.lr_gamma, train.momentum, train.nesterov) == (0.1, 0.1, 0.9, True)
    assert (train.weight_decay, train.batch_size, train.rewind_epoch) == (1e-4, 128, 2)
    assert (job.data.dataset, job.model.name, job.model.mlp_hidden) == ("digits", "mlp", [300, 100])
    assert (job.resources.cpus, job.resources.gpus, job.resources.max_failures) == (1.0, 0.0, 2)
    assert job.retrain.enabled is True and job.retrain.epochs is None
    assert job.storage.path == "./ticketsearch-runs"


def test_every_field_has_a_description() -> None:
    schema = job_json_schema()
    missing = [
        f"{model}.{name}"
        for model, body in schema["$defs"].items()
        if not model.endswith("Sweep")
        for name, prop in body.get("properties", {}).items()
        if not prop.get("description")
    ]
    missing += [n for n, p in schema["properties"].items() if not p.get("description")]
    assert missing == []


def test_lambda_accepts_alias_and_field_name_and_numeric_strings() -> None:
    assert CSSpec(**{"lambda": 2e-8}).lambda_ == 2e-8
    assert CSSpec(lambda_=3e-8).lambda_ == 3e-8
    # PyYAML reads "1e-7" (no dot) as a string; it must still become a float.
    assert (
        parse_job(yaml.safe_load("name: j\nmethods: {cs: {lambda: 1e-7}}")).methods["cs"].lambda_
        == 1e-7
    )


def test_specs_are_frozen() -> None:
    job = parse_job(minimal())
    with pytest.raises(Exception, match="frozen"):
        job.train.lr = 0.5  # type: ignore[misc]


# ------------------------------------------------------------------ bad input


def test_unknown_top_level_key_lists_allowed_keys() -> None:
    assert problems_of(minimal(trian={})) == [
        "trian: unknown key; allowed keys are: code, data, description, methods, model, name, "
        "resources, retrain, storage, tracking, train (did you mean 'train'?)"
    ]


def test_unknown_nested_key_names_the_path_and_allowed_keys() -> None:
    (line,) = problems_of(minimal(train={"epochz": 3}))
    assert line.startswith(
        "train.epochz: unknown key; allowed keys are: batch_size, channels_last, "
        "checkpoint_every, checkpoint_every_s, compile, device, epochs_per_round, eval_every, lr, lr_gamma, "
        "lr_milestones, momentum, nesterov, precision, rewind_epoch, weight_decay"
    )


def test_wrong_literal_value_lists_allowed_values() -> None:
    raw = {"name": "job", "methods": {"cs": {"soft_reset": "hard"}}}
    assert problems_of(raw) == [
        "methods.cs.soft_reset: must be one of 'scaled', 'clip' (got 'hard')"
    ]


def test_negative_lr() -> None:
    assert problems_of(minimal(train={"lr": -0.1})) == [
        "train.lr: must be greater than 0 (got -0.1)"
    ]


def test_rewind_epoch_must_fall_inside_the_round() -> None:
    (line,) = problems_of(
        minimal(train={"epochs_per_round": 10, "rewind_epoch": 10, "lr_milestones": []})
    )
    assert line.startswith("train.rewind_epoch: must be below train.epochs_per_round (10) (got 10)")


def test_milestones_must_increase_and_fit_the_round() -> None:
    lines = problems_of(minimal(train={"lr_milestones": [71, 56, 90]}))
    assert lines[0] == "train.lr_milestones: must be strictly increasing (got [71, 56, 90])"
    assert lines[1].startswith(
        "train.lr_milestones: milestones [90] are not below train.epochs_per_round (85); "
        "each milestone must be in 1..84"
    )
    assert problems_of(minimal(train={"lr_milestones": [56, 56]})) == [
        "train.lr_milestones: must be strictly increasing (got [56, 56])"
    ]
    assert problems_of(minimal(train={"lr_milestones": [0, 5]})) == [
        "train.lr_milestones[0]: must be greater than or equal to 1 (got 0)"
    ]


def test_prune_fraction_out_of_range() -> None:
    raw = {"name": "job", "methods": {"imp": {"prune_fraction": 1.0}}}
    assert problems_of(raw) == ["methods.imp.prune_fraction: must be less than 1 (got 1.0)"]
    raw = {"name": "job", "methods": {"imp": {"prune_fraction": 0}}}
    assert problems_of(raw) == ["methods.imp.prune_fraction: must be greater than 0 (got 0)"]


def test_unknown_sweep_axis_lists_allowed_axes() -> None:
    raw = {"name": "job", "methods": {"cs": {"sweep": {"s0": [0.0]}}}}
    assert problems_of(raw) == [
        "methods.cs.sweep.s0: unknown sweep axis; allowed sweep axes are: "
        "beta_final, lambda, mask_init, seed, target_sparsity"
    ]
    raw = {"name": "job", "methods": {"imp": {"sweep": {"lambda": [1e-8]}}}}
    assert problems_of(raw) == [
        "methods.imp.sweep.lambda: unknown sweep axis; allowed sweep axes are: "
        "prune_fraction, rewind_between_rounds, rounds, scope, seed"
    ]


def test_empty_sweep_list() -> None:
    raw = {"name": "job", "methods": {"cs": {"sweep": {"mask_init": []}}}}
    assert problems_of(raw) == [
        "methods.cs.sweep.mask_init: a sweep axis needs at least one value (got an empty list)"
    ]


def test_sweep_values_are_checked_like_the_scalar_knob() -> None:
    raw = {"name": "job", "methods": {"cs": {"sweep": {"lambda": [1e-8, -1, "big"]}}}}
    assert problems_of(raw) == [
        "methods.cs.sweep.lambda[1]: must be greater than or equal to 0 (got -1)",
        "methods.cs.sweep.lambda[2]: must be a valid number, unable to parse string as a number "
        "(got 'big')",
    ]
    raw = {"name": "job", "methods": {"imp": {"sweep": {"scope": ["global", "local"]}}}}
    assert problems_of(raw) == [
        "methods.imp.sweep.scope[1]: must be one of 'global', 'layerwise' (got 'local')"
    ]
    raw = {"name": "job", "methods": {"cs": {"sweep": {"seed": 3}}}}
    assert problems_of(raw) == ["methods.cs.sweep.seed: must be a valid list (got 3)"]


def test_duplicate_sweep_values_name_the_sweep_field() -> None:
    raw = {"name": "job", "methods": {"cs": {"sweep": {"mask_init": [0, -0.1, 0.0]}}}}
    (line,) = problems_of(raw)
    assert line.startswith("methods.cs.sweep.mask_init: duplicate value 0.0 in [0.0, -0.1, 0.0]")


def test_fractional_gpus_above_one() -> None:
    assert problems_of(minimal(resources={"gpus": 1.5})) == [
        "resources.gpus: fractional GPUs must be ≤ 1 (got 1.5); use a whole number to take several"
    ]
    assert parse_job(minimal(resources={"gpus": 2})).resources.gpus == 2.0
    assert parse_job(minimal(resources={"gpus": 0.25})).resources.gpus == 0.25


def test_missing_name() -> None:
    assert problems_of({"methods": {"cs": {}}}) == ["name: required key is missing"]


def test_bad_name_characters_and_length() -> None:
    assert problems_of({"name": "my job!", "methods": {"cs": {}}}) == [
        "name: must start with a letter or digit and contain only letters, digits, "
        "'_', '.', '-' (got 'my job!')"
    ]
    (line,) = problems_of({"name": "-job", "methods": {"cs": {}}})
    assert line.startswith("name: must start with a letter or digit")
    assert problems_of({"name": "a" * 65, "methods": {"cs": {}}}) == [
        "name: must be at most 64 characters (got 65)"
    ]


def test_no_methods() -> None:
    expected = ["methods: enable at least one of dense, cs, imp, rigl (e.g. 'cs: {}')"]
    assert problems_of({"name": "job", "methods": {}}) == expected
    assert problems_of({"name": "job", "methods": {"cs": None}}) == expected
    assert problems_of({"name": "job"}) == ["methods: required key is missing"]


def test_cifar10_without_root() -> None:
    (line,) = problems_of(minimal(data={"dataset": "cifar10"}))
    assert line.startswith("data.root: cifar10 needs a root directory")
    (line,) = problems_of(minimal(data={"dataset": "cifar10", "download": True}))
    assert line.startswith("data.root: cifar10 needs a root directory")
    assert parse_job(minimal(data={"dataset": "cifar10", "root": "/data"})).data.root == "/data"


def test_imagenet_cannot_be_downloaded() -> None:
    (line,) = problems_of(minimal(data={"dataset": "imagenet", "root": "/d", "download": True}))
    assert line.startswith("data.download: imagenet cannot be downloaded")


def test_resnet20_on_digits_is_rejected() -> None:
    assert problems_of(minimal(model={"name": "resnet20"})) == [
        "model.name: resnet20 expects 3-channel 32x32 images (cifar10, cifar100, or synthetic "
        "with synthetic_shape [3,32,32]); dataset digits gives 64 features"
    ]
    (line,) = problems_of(
        minimal(model={"name": "resnet50"}, data={"dataset": "cifar10", "root": "/d"})
    )
    assert line.startswith("model.name: resnet50 expects 3-channel images")
    ok = parse_job(
        minimal(
            model={"name": "vgg16"}, data={"dataset": "synthetic", "synthetic_shape": [3, 32, 32]}
        )
    )
    assert ok.model.name == "vgg16"


def test_wrong_type_for_a_section_and_empty_masked_layers() -> None:
    assert problems_of(minimal(train=5)) == ["train: must be a mapping of keys to values (got 5)"]
    (line,) = problems_of(minimal(model={"masked_layers": []}))
    assert line.startswith("model.masked_layers: must list at least one module-name pattern")


def test_all_problems_are_reported_together() -> None:
    raw = {"name": "job", "bogus": 1, "train": {"lr": 0}, "methods": {"imp": {"scope": "x"}}}
    lines = problems_of(raw)
    assert [line.split(":")[0] for line in lines] == ["train.lr", "methods.imp.scope", "bogus"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: job\nmethods:\n  cs: {}\ntrain: [1, 2\n")
    with pytest.raises(SpecError, match=r"job\.yaml: YAML syntax error at line 5"):
        load_job(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: job spec file not found; check the path"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="the top level must be a mapping .* got a list"):
        load_job(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(SpecError, match="the file is empty"):
        load_job(write(tmp_path, "", "empty.yaml"))


def test_malformed_override_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal()))
    with pytest.raises(SpecError) as info:
        load_job(path, ["train.epochs_per_round"])
    assert str(info.value).startswith(
        "override 'train.epochs_per_round': expected dotted.key=value"
    )
    with pytest.raises(SpecError, match=r"override 'train..lr=1'"):
        load_job(path, ["train..lr=1"])
    with pytest.raises(SpecError, match=r"override 'name.x=1': name is 'job', not a mapping"):
        load_job(path, ["name.x=1"])


# ------------------------------------------------------------------ trials


def grid_job() -> JobSpec:
    return parse_job(
        {
            "name": "grid",
            "methods": {
                "imp": {"sweep": {"rewind_between_rounds": [True, False]}},
                "cs": {"sweep": {"seed": [0, 1], "mask_init": [-0.1, 0], "lambda": [1e-8, 5e-8]}},
                "dense": {"seed": 3},
            },
        }
    )


def test_trials_expand_in_order_with_ids_and_names() -> None:
    trials = grid_job().trials()
    assert len(trials) == 1 + 8 + 2
    assert [t.method for t in trials] == ["dense"] + ["cs"] * 8 + ["imp"] * 2
    assert [t.trial_id for t in trials] == [
        "dense-seed=3",
        "cs-s0=-0.1-lam=1e-08-beta=200-seed=0",
        "cs-s0=-0.1-lam=1e-08-beta=200-seed=1",
        "cs-s0=0-lam=1e-08-beta=200-seed=0",
        "cs-s0=0-lam=1e-08-beta=200-seed=1",
        "cs-s0=-0.1-lam=5e-08-beta=200-seed=0",
        "cs-s0=-0.1-lam=5e-08-beta=200-seed=1",
        "cs-s0=0-lam=5e-08-beta=200-seed=0",
        "cs-s0=0-lam=5e-08-beta=200-seed=1",
        "imp-global-p=0.2-seed=0",
        "imp-c-global-p=0.2-seed=0",
    ]
    assert [trials[i].name for i in (0, 1, 9, 10)] == [
        "dense seed=3",
        "cs s0=-0.1 λ=1e-08 β=200 seed=0",
        "imp global p=0.2 seed=0",
        "imp-c global p=0.2 seed=0",
    ]


def test_trials_carry_resolved_settings() -> None:
    trials = grid_job().trials()
    cs = trials[6]
    assert isinstance(cs, TrialSpec)
    assert (cs.settings.lambda_, cs.settings.mask_init, cs.settings.seed, cs.seed) == (5e-8, -0.1, 1, 1)
    assert cs.settings.sweep == {} and cs.method == "cs" and cs.job_name == "grid"
    imp_c = trials[10]
    assert imp_c.settings.rewind_between_rounds is False and imp_c.settings.sweep == {}
    assert trials[0].seed == 3 and trials[0].method == "dense"
    assert TrialSpec.model_validate(cs.model_dump(mode="json", by_alias=True)) == cs


def test_imp_round_sweep_names_the_round_count() -> None:
    job = parse_job(
        {"name": "j", "methods": {"imp": {"sweep": {"rounds": [2, 3], "scope": ["layerwise"]}}}}
    )
    assert [t.trial_id for t in job.trials()] == [
        "imp-layerwise-p=0.2-r=2-seed=0",
        "imp-layerwise-p=0.2-r=3-seed=0",
    ]


def test_sweep_values_are_coerced_and_ordered_by_axis() -> None:
    job = parse_job(
        {"name": "j", "methods": {"cs": {"sweep": {"seed": [1], "lambda": ["1e-7", 0]}}}}
    )
    assert job.methods["cs"].sweep == {"lambda": [1e-7, 0.0], "seed": [1]}
    assert list(job.methods["cs"].sweep) == ["lambda", "seed"]


# ------------------------------------------------------------------ hash, schema, I/O


def test_hash_is_stable_under_key_order_and_explicit_defaults() -> None:
    plain = parse_job({"name": "j", "methods": {"cs": {"sweep": {"mask_init": [0, -0.1]}}}})
    spelled = parse_job(
        {
            "train": {"lr_milestones": [56, 71], "epochs_per_round": 85},
            "methods": {"cs": {"lambda": 1e-8, "sweep": {"mask_init": [0.0, -0.1]}}, "imp": None},
            "name": "j",
            "data": {"dataset": "digits"},
        }
    )
    assert plain == spelled
    assert plain.spec_hash() == spelled.spec_hash()
    assert len(plain.spec_hash()) == 12 and int(plain.spec_hash(), 16) >= 0
    changed = parse_job({"name": "j", "methods": {"cs": {"sweep": {"mask_init": [-0.1, 0]}}}})
    assert changed.spec_hash() != plain.spec_hash()


def test_json_schema_is_exportable() -> None:
    schema = job_json_schema()
    text = json.dumps(schema)
    assert "properties" in schema and set(schema["required"]) == {"name", "methods"}
    cs_props = schema["$defs"]["CSSpec"]["properties"]
    assert "lambda" in cs_props and "lambda_" not in cs_props
    assert set(cs_props["sweep"]["properties"]) == {"lambda", "beta_final", "mask_init",
                                                    "target_sparsity", "seed"}
    assert cs_props["sweep"]["properties"]["lambda"]["items"]["minimum"] == 0
    assert '"scaled"' in text


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    job = grid_job()
    text = dump_job(job)
    assert "lambda:" in text and "lambda_" not in text
    again = load_job(write(tmp_path, text))
    assert again == job
    assert again.spec_hash() == job.spec_hash()


def test_load_job_reads_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "name: smoke\nmethods:\n  dense: {}\n  cs:\n    lambda: 1e-7\n")
    job = load_job(str(path))
    assert job.name == "smoke" and job.methods["cs"].lambda_ == 1e-7 and "imp" not in job.methods


# ------------------------------------------------------------------ overrides


def test_overrides_set_values_and_create_mappings(tmp_path: Path) -> None:
    path = write(tmp_path, "name: j\nmethods:\n  dense: {}\n")
    job = load_job(
        path,
        [
            "data.dataset=synthetic",
            "methods.cs.sweep.mask_init=[-0.1,0]",
            "train.batch_size=32",
            "methods.dense=null",
            "description=a b=c",
        ],
    )
    assert job.data.dataset == "synthetic"
    assert job.methods["cs"].sweep == {"mask_init": [-0.1, 0.0]}
    assert "dense" not in job.methods and job.train.batch_size == 32
    assert job.description == "a b=c"


def test_epochs_override_rescales_milestones_and_rewind(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal()))
    job = load_job(path, ["train.epochs_per_round=10"])
    assert job.train.epochs_per_round == 10
    assert job.train.lr_milestones == [7, 8]
    assert job.train.rewind_epoch == 2
    tiny = load_job(path, ["train.epochs_per_round=1"])
    assert (tiny.train.lr_milestones, tiny.train.rewind_epoch) == ([], 0)
    two = load_job(path, ["train.epochs_per_round=2"])
    assert (two.train.lr_milestones, two.train.rewind_epoch) == ([1], 1)


def test_epochs_override_rescales_milestones_written_in_the_file(tmp_path: Path) -> None:
    raw = minimal(train={"epochs_per_round": 20, "lr_milestones": [10, 15], "rewind_epoch": 5})
    path = write(tmp_path, yaml.safe_dump(raw))
    job = load_job(path, ["train.epochs_per_round=4"])
    assert (job.train.lr_milestones, job.train.rewind_epoch) == ([2, 3], 3)


def test_explicit_milestones_and_rewind_override_are_kept_strict(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(minimal()))
    job = load_job(path, ["train.epochs_per_round=10", "train.lr_milestones=[5]"])
    assert job.train.lr_milestones == [5]
    with pytest.raises(
        SpecError, match=r"train.rewind_epoch: must be below train.epochs_per_round \(3\)"
    ):
        load_job(path, ["train.epochs_per_round=3", "train.rewind_epoch=5"])
    # Without an override, milestones that do not fit stay an error.
    with pytest.raises(SpecError, match=r"train.lr_milestones: milestones \[71\] are not below"):
        parse_job(minimal(train={"epochs_per_round": 60}))


def test_apply_overrides_does_not_mutate_its_input() -> None:
    raw = minimal(train={"lr": 0.1})
    out = apply_overrides(raw, ["train.lr=0.5", "methods.cs.seed=4"])
    assert raw == minimal(train={"lr": 0.1})
    assert out["train"]["lr"] == 0.5 and out["methods"]["cs"] == {"seed": 4}


def test_rescale_milestones_and_milestones_for() -> None:
    assert rescale_milestones([56, 71], 85, 10) == [7, 8]
    assert rescale_milestones([56, 71], 85, 85) == [56, 71]
    assert rescale_milestones([56, 71], 85, 170) == [112, 142]
    assert rescale_milestones([1, 2], 85, 3) == [1]
    train = TrainSpec()
    assert train.milestones_for(85) == [56, 71]
    assert train.milestones_for(10) == [7, 8]


def test_models_validate_directly() -> None:
    assert DataSpec(dataset="synthetic", synthetic_shape=[3, 32, 32]).synthetic_shape == [3, 32, 32]
    with pytest.raises(ValueError, match="greater than or equal to 16"):
        DataSpec(synthetic_size=8)
    assert IMPSpec(sweep={"seed": [1, 2]}).expand()[1].seed == 2


# ------------------------------------------------------------------ refused silently before


def cli_error(path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """``ticketsearch validate`` of ``path``: asserts exit code 2; returns its error text."""
    args = ["validate", str(path)] + [arg for o in overrides for arg in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _number_fields(model: type) -> list[tuple[str, Any]]:
    """(key, boolean input) for every number and list-of-numbers field of ``model``, read off
    its JSON schema."""
    numeric = {"integer", "number"}
    found = []
    for key, prop in model.model_json_schema(by_alias=True)["properties"].items():
        types = {prop.get("type")} | {option.get("type") for option in prop.get("anyOf", [])}
        if types & numeric:
            found.append((key, True))
        elif prop.get("type") == "array" and prop.get("items", {}).get("type") in numeric:
            found.append((key, [True]))
    return found


def _section_models() -> list[type]:
    return [DataSpec, ModelSpec, TrainSpec, RecipeSpec, RetrainSpec, ResourcesSpec,
            TrackingSpec, StorageSpec, CodeSpec, *(m.spec for m in methods())]


def test_booleans_are_refused_for_every_number_field() -> None:
    checked = 0
    for model in _section_models():
        required = {"name": "r"} if model.__name__ == "RecipeSpec" else {}
        for key, value in _number_fields(model):
            with pytest.raises(ValidationError) as info:
                model.model_validate({**required, key: value})
            where = key if value is True else f"{key}[0]"
            lines = spec_error_from(info.value, model).problems
            assert any(line.startswith(f"{where}: must be a number, not the boolean true")
                       for line in lines), (model.__name__, lines)
            checked += 1
    assert checked > 30


def test_booleans_are_refused_with_the_field_path(tmp_path: Path, capsys) -> None:
    assert problems_of(minimal(train={"epochs_per_round": True})) == [
        "train.epochs_per_round: must be a number, not the boolean true (YAML reads true/false, "
        "yes/no, on/off as booleans); write a number"
    ]
    raw = {"name": "j", "methods": {"cs": {"sweep": {"lambda": [1e-8, False]}}},
           "retrain": {"recipes": [{"name": "m", "mixup_alpha": True}]}}
    assert [line.split(":")[0] for line in problems_of(raw)] == [
        "methods.cs.sweep.lambda[1]", "retrain.recipes[0].mixup_alpha"]
    job = parse_job(minimal(model={"factory": "m:f", "kwargs": {"flag": True}},
                            train={"nesterov": False}))
    assert job.model.kwargs == {"flag": True} and job.train.nesterov is False
    path = write(tmp_path, "name: j\nmethods: {cs: {}}\ntrain:\n  epochs_per_round: yes\n")
    assert "train.epochs_per_round: must be a number" in cli_error(path, capsys)
    path = write(tmp_path, "name: j\nmethods: {cs: {}}\n", "ok.yaml")
    assert "methods.cs.rounds: must be a number" in cli_error(path, capsys, "methods.cs.rounds=true")


def test_duplicate_keys_are_refused_at_any_depth(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "name: j\nmethods:\n  cs: {}\nname: k\n")
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert str(info.value) == (f"{path}: duplicate key 'name' at lines 1 and 4; keep one of "
                               "them (YAML would silently use the last)")
    nested = "name: j\nmethods:\n  cs:\n    lambda: 1.0e-8\n    rounds: 2\n    lambda: 5.0e-8\n"
    path = write(tmp_path, nested, "nested.yaml")
    assert f"{path}: duplicate key 'lambda' at lines 4 and 6" in cli_error(path, capsys)
    path = write(tmp_path, "name: j\nmethods:\n  cs: {}\n  dense: {}\n  cs: {rounds: 1}\n", "m.yaml")
    with pytest.raises(SpecError, match="duplicate key 'cs' at lines 3 and 5"):
        load_job(path)
    path = write(tmp_path, "name: j\ntrain: {lr: 0.1, lr: 0.2}\nmethods: {cs: {}}\n", "t.yaml")
    with pytest.raises(SpecError, match=r"t\.yaml: duplicate key 'lr' at line 2; keep one"):
        load_job(path)
    with pytest.raises(SpecError, match=r"override 'train=.*duplicate key 'lr' at line 1"):
        load_job(write(tmp_path, "name: j\nmethods: {cs: {}}\n"), ["train={lr: 1, lr: 2}"])


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = "name: j\nmethods:\n  cs: &base {seed: 1}\n  rigl:\n    <<: *base\n    seed: 2\n"
    job = load_job(write(tmp_path, text))
    assert (job.methods["cs"].seed, job.methods["rigl"].seed) == (1, 2)


def test_unknown_key_in_a_recipe_lists_the_allowed_keys() -> None:
    raw = minimal(retrain={"recipes": ["vanilla", {"name": "mix", "mixupp": 0.2}]})
    assert problems_of(raw) == [
        "retrain.recipes[1].mixupp: unknown key; allowed keys are: activation, cutmix_alpha, "
        "label_smoothing, mixup_alpha, name, warmup_epochs (did you mean 'mixup_alpha'?)"
    ]


def test_seeds_must_fit_torch_and_numpy(tmp_path: Path, capsys) -> None:
    top = 2**63 - 1
    message = f"must be an integer from 0 to 2**63 - 1 = {top}"
    for method in ("dense", "cs", "imp", "rigl"):
        (line,) = problems_of({"name": "j", "methods": {method: {"seed": 2**70}}})
        assert line == f"methods.{method}.seed: {message} (got {2**70})"
    (line,) = problems_of({"name": "j", "methods": {"cs": {"sweep": {"seed": [0, -1]}}}})
    assert line == f"methods.cs.sweep.seed[1]: {message} (got -1)"
    (line,) = problems_of(minimal(data={"split_seed": 2**32}))
    assert line.startswith(f"data.split_seed: must be an integer from 0 to 2**32 - 1 = {2**32 - 1}")
    (trial,) = parse_job({"name": "j", "methods": {"dense": {"seed": top}}}).trials()
    assert trial.seed == top and trial.trial_id == f"dense-seed={top}"
    assert parse_job(minimal(data={"split_seed": 2**32 - 1})).data.split_seed == 2**32 - 1
    path = write(tmp_path, "name: j\nmethods: {cs: {}}\n")
    assert f"methods.cs.seed: {message}" in cli_error(path, capsys, f"methods.cs.seed={2**70}")


def test_a_registered_method_with_an_unchecked_seed_gets_a_spec_error() -> None:
    class LooseSpec(MethodSpec):
        """A method whose own spec leaves its seed unchecked."""

        sweep_axes: ClassVar[tuple[str, ...]] = ("seed",)
        seed: int = Field(0, description="An unchecked seed.")
        sweep: dict[str, list[Any]] = Field(default_factory=dict, description="Grid axes.")

    register(Method(name="loose", spec=LooseSpec, run=lambda run: {},
                    identity=lambda s, swept: (f"loose-seed={s.seed}", "loose"),
                    planned_epochs=lambda trial: 0, description="Loose", label="loose",
                    order=99))
    try:
        job = parse_job({"name": "j", "methods": {"loose": {"seed": 2**70}}})
        with pytest.raises(SpecError) as info:
            job.trials()
        assert str(info.value) == (f"methods.loose.seed: must be an integer from 0 to 2**63 - 1 "
                                   f"= {2**63 - 1} (got {2**70})")
    finally:
        unregister("loose")


def test_huge_values_give_short_trial_ids() -> None:
    assert [format_number(x) for x in (200.0, 1e15, 1e16, 1e308, -1.5e300, 5e-324, 7)] == [
        "200", "1000000000000000", "1e16", "1e308", "-1.5e300", "5e-324", "7"]
    job = parse_job({"name": "j", "methods": {"cs": {"beta_final": 1e308,
                                                      "sweep": {"mask_init": [-1e300, 0]}}}})
    assert [t.trial_id for t in job.trials()] == [
        "cs-s0=-1e300-lam=1e-08-beta=1e308-seed=0", "cs-s0=0-lam=1e-08-beta=1e308-seed=0"]
    assert job.trials()[0].settings.beta_final == 1e308
    rounds = [2, 10**150, 10**150 + 1]
    job = parse_job({"name": "j", "methods": {"imp": {"sweep": {"rounds": rounds}}}})
    ids = [t.trial_id for t in job.trials()]
    assert ids[0] == "imp-global-p=0.2-r=2-seed=0"
    assert len(set(ids)) == 3 and all(len(i) <= 120 for i in ids)
    assert all(re.match(TRIAL_ID_PATTERN, i) for i in ids)
    assert ids == [t.trial_id for t in parse_job(job.model_dump(by_alias=True)).trials()]
    assert ids[1].startswith("imp-global-p=0.2-r=1000")


def test_tracking_uri_needs_a_supported_scheme(tmp_path: Path, capsys) -> None:
    accepted = ["http://127.0.0.1:5000", "https://mlflow.example.org", "sqlite:////tmp/m.db",
                "postgresql://u:p@db/mlflow", "mysql+pymysql://u@db/mlflow", "databricks",
                "databricks://profile"]
    for uri in accepted:
        assert parse_job(minimal(tracking={"uri": uri})).tracking.uri == uri
    for uri, why in (("notauri", "is not a URI"), ("/tmp/mlruns", "is not a URI"),
                     ("file:///tmp/x", "MLflow's plain file store is not supported"),
                     ("http://", "needs a host")):
        (line,) = problems_of(minimal(tracking={"uri": uri}))
        assert line.startswith(f"tracking.uri: {why}"), line
        assert "http(s)://HOST:PORT" in line and "sqlite:///PATH" in line
        assert "null = a local SQLite store under storage.path" in line
    path = write(tmp_path, "name: j\nmethods: {cs: {}}\n")
    assert "tracking.uri: is not a URI" in cli_error(path, capsys, "tracking.uri=notauri")


def test_storage_path_expands_home_and_refuses_buckets(tmp_path: Path, capsys,
                                                       monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_job(minimal(storage={"path": "~/runs"})).storage.path == f"{tmp_path}/runs"
    assert parse_job(minimal()).spec_hash() == "b42980da69c3"
    for path in ("s3://bucket/x", "gs://b/x", "gcs://b", "hdfs://nn/x", "abfs://c@a/x",
                 "file:///x"):
        (line,) = problems_of(minimal(storage={"path": path}))
        assert line.startswith("storage.path: must be a filesystem path every node sees"), line
        assert "bucket storage is not supported yet" in line and repr(path) in line
    spec = write(tmp_path, "name: j\nmethods: {cs: {}}\nstorage: {path: s3://b/x}\n")
    assert "storage.path: must be a filesystem path" in cli_error(spec, capsys)
    assert not (tmp_path / "s3:").exists()
    ok = write(tmp_path, "name: j\nmethods: {cs: {}}\n", "ok.yaml")
    assert "storage.path: must be" in cli_error(ok, capsys, "storage.path=gs://b/x")
    assert load_job(ok, ["storage.path=~/x"]).storage.path == f"{tmp_path}/x"
